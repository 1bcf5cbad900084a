from django.urls import path

from reviewapp.exports import api

urlpatterns = [
    path("sources/<slug:slug>/labels/export/", api.LabelExportApi.as_view(), name="api-labels-export"),
    path("sources/<slug:slug>/labels/exports/", api.ExportJobListApi.as_view(), name="api-export-jobs"),
    path("exports/<int:pk>/", api.ExportJobApi.as_view(), name="api-export-job"),
    path("exports/<int:pk>/download/", api.ExportDownloadApi.as_view(), name="api-export-download"),
]
