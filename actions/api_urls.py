from django.urls import path

from actions import api

urlpatterns = [
    path("sources/<slug:slug>/actions/", api.SourceActionsApi.as_view(), name="api-source-actions"),
    path("decisions/<int:decision_id>/actions/", api.DecisionRunsApi.as_view(), name="api-decision-actions"),
    path("action-runs/", api.RunListApi.as_view(), name="api-action-runs"),
    path("action-runs/<int:run_id>/approve/", api.RunApproveApi.as_view(), name="api-action-run-approve"),
    path("action-runs/<int:run_id>/reject/", api.RunRejectApi.as_view(), name="api-action-run-reject"),
    path("action-runs/<int:run_id>/replay/", api.RunReplayApi.as_view(), name="api-action-run-replay"),
]
