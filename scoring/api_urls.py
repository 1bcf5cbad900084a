from django.urls import path

from scoring import api

urlpatterns = [
    path("sources/<slug:slug>/models/", api.SourceModelsApi.as_view(), name="api-source-models"),
    path("models/<int:pk>/", api.ModelDetailApi.as_view(), name="api-model-detail"),
    path("models/<int:pk>/promote/", api.ModelPromoteApi.as_view(), name="api-model-promote"),
    path("models/<int:pk>/shadow/", api.ModelShadowApi.as_view(), name="api-model-shadow"),
    path("models/<int:pk>/risk-control/", api.ModelRiskControlApi.as_view(), name="api-model-risk-control"),
    path("items/<int:pk>/similar/", api.ItemSimilarApi.as_view(), name="api-item-similar"),
]
