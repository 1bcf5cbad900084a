from django.urls import path

from reviewapp.review import views

app_name = "review"
urlpatterns = [
    path("queue/", views.queue, name="queue"),
    path("queue/counts/", views.queue_counts, name="queue_counts"),
    path("review/", views.work, name="work"),
    path("review/claim/", views.claim, name="claim"),
    path("review/items/<int:item_id>/verdict/", views.verdict, name="verdict"),
    path("review/items/<int:item_id>/skip/", views.skip, name="skip"),
    path("review/items/<int:item_id>/lease/", views.renew, name="renew"),
    # Issue 5: the analyst's workspace.
    path("queue/bulk/", views.queue_bulk, name="queue_bulk"),
    path("review/items/<int:item_id>/escalate/", views.escalate, name="escalate"),
    path("review/undo/", views.undo, name="undo"),
    path("review/items/<int:item_id>/", views.item_detail, name="item"),
    path("review/items/<int:item_id>/similar/", views.item_similar, name="item_similar"),
    path("review/items/<int:item_id>/history/", views.item_history, name="item_history"),
    path("review/adjudication/", views.adjudication, name="adjudication"),
    path("review/stats/", views.stats, name="stats"),
]

# Policy editor (issue 6).
from reviewapp.review import policy_views  # noqa: E402

urlpatterns += [
    path("policies/", policy_views.policy_index, name="policy_index"),
    path("sources/<slug:slug>/policy/", policy_views.policy_editor, name="policy_editor"),
    path("sources/<slug:slug>/policy/simulate/", policy_views.policy_simulate_view, name="policy_simulate"),
    path("sources/<slug:slug>/policy/save/", policy_views.policy_save, name="policy_save"),
    path("sources/<slug:slug>/policy/restore/<int:version>/", policy_views.policy_restore_view,
         name="policy_restore"),
    path("sources/<slug:slug>/policy/reroute/", policy_views.policy_reroute_progress,
         name="policy_reroute_progress"),
]
