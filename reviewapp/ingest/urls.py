from django.urls import path

from reviewapp.ingest import views

app_name = "ingest"
urlpatterns = [
    path("sources/", views.source_list, name="source_list"),
    path("sources/new/", views.source_create, name="source_create"),
    path("sources/new/from-sample/", views.source_infer, name="source_infer"),
    path("sources/<slug:slug>/", views.source_detail, name="source_detail"),
    path("sources/<slug:slug>/schemas/", views.source_schemas, name="source_schemas"),
    path("sources/<slug:slug>/upload/", views.batch_upload, name="batch_upload"),
    path("batches/<int:batch_id>/", views.batch_detail, name="batch_detail"),
    path("batches/<int:batch_id>/quarantine/", views.batch_quarantine, name="batch_quarantine"),
    path("batches/<int:batch_id>/quarantine/download/", views.batch_quarantine_download,
         name="batch_quarantine_download"),
]
