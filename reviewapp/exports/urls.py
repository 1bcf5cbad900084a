from django.urls import path

from reviewapp.exports import views

app_name = "exports"
urlpatterns = [
    path("exports/", views.export_list, name="list"),
    path("exports/rows/", views.export_rows, name="rows"),
    path("exports/<int:pk>/", views.export_detail, name="detail"),
    path("exports/<int:pk>/download/", views.export_download, name="download"),
]
