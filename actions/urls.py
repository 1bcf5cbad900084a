from django.urls import path

from actions import views

app_name = "actions"
urlpatterns = [
    path("actions/", views.run_list, name="run_list"),
    path("actions/runs/<int:run_id>/approve/", views.run_approve, name="run_approve"),
    path("actions/runs/<int:run_id>/reject/", views.run_reject, name="run_reject"),
    path("actions/runs/<int:run_id>/replay/", views.run_replay, name="run_replay"),
    path("actions/sources/<slug:slug>/", views.source_actions, name="source_actions"),
]
