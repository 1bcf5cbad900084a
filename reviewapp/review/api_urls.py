from django.urls import path

from reviewapp.review import api

urlpatterns = [
    path("queue/claim/", api.ClaimNextApi.as_view(), name="api-queue-claim"),
    path("items/<int:item_id>/release/", api.ItemReleaseApi.as_view(), name="api-item-release"),
    path("items/<int:item_id>/lease/", api.ItemLeaseApi.as_view(), name="api-item-lease"),
    path("items/<int:item_id>/verdicts/", api.ItemVerdictApi.as_view(), name="api-item-verdicts"),
    path("sources/<slug:slug>/policy/", api.SourcePolicyApi.as_view(), name="api-source-policy"),
    # Issue 5: escalation, undo, bulk verdicts, per-analyst figures.
    path("items/<int:item_id>/escalate/", api.ItemEscalateApi.as_view(), name="api-item-escalate"),
    path("verdicts/undo/", api.VerdictUndoApi.as_view(), name="api-verdict-undo"),
    path("verdicts/bulk/", api.BulkVerdictApi.as_view(), name="api-verdicts-bulk"),
    path("review/analysts/", api.AnalystFiguresApi.as_view(), name="api-analyst-figures"),
]

# Policy editor (issue 6).
from reviewapp.review import policy_api  # noqa: E402

urlpatterns += [
    path("sources/<slug:slug>/policy/simulate/", policy_api.PolicySimulateApi.as_view(),
         name="api-source-policy-simulate"),
    path("sources/<slug:slug>/policy/versions/", policy_api.PolicyVersionsApi.as_view(),
         name="api-source-policy-versions"),
    path("sources/<slug:slug>/policy/restore/", policy_api.PolicyRestoreApi.as_view(),
         name="api-source-policy-restore"),
    path("sources/<slug:slug>/policy/promise/", policy_api.PolicyPromiseApi.as_view(),
         name="api-source-policy-promise"),
    path("sources/<slug:slug>/policy/reroute/", policy_api.PolicyRerouteApi.as_view(),
         name="api-source-policy-reroute"),
    path("sources/<slug:slug>/policy/reroute/<str:run_id>/", policy_api.PolicyRerouteProgressApi.as_view(),
         name="api-source-policy-reroute-progress"),
]
