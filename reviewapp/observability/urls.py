from django.urls import path

from reviewapp.observability import views

app_name = "observability"
urlpatterns = [
    path("dashboard/", views.dashboard, name="dashboard"),
    path("dashboard/drift/", views.drift_page, name="drift"),
    path("dashboard/drift/compute/", views.drift_compute, name="drift_compute"),
    path("dashboard/alerts/", views.alerts_page, name="alerts"),
    path("dashboard/alerts/<int:pk>/", views.alert_rule_edit, name="alert_rule_edit"),
    path("decisions/<int:pk>/trail/", views.decision_trail, name="decision_trail"),
]
