"""Re-route on apply, through a real Celery worker: progress and audit."""

from __future__ import annotations

from reviewapp.core.models import AuditEvent
from reviewapp.ingest.models import Item
from reviewapp.review.models import ReviewTask
from reviewapp.review.policy_selectors import reroute_progress_for_run
from reviewapp.review.policy_services import policy_update
from tests.conftest import wait_for
from tests.review.helpers import make_scored_items
from tests.review.policy_helpers import make_champion, source_setup


def test_reroute_runs_in_the_worker_with_progress(live_worker, admin_user) -> None:
    source = source_setup(thresholds={"legit": 0.999})
    model = make_champion(source)
    specs = [("legit", 0.95)] * 30 + [("legit", 0.6)] * 10 + [("fraud", 0.99)] * 5
    items = make_scored_items(source, specs, model=model)
    assert {i.state for i in items} == {Item.State.QUEUED}
    saved = policy_update(source=source, actor=admin_user, thresholds={"legit": 0.9}, qa_sample_rate=0.0,
                          reroute=True, comment="loosen legit")
    progress = wait_for(
        lambda: (p := reroute_progress_for_run(source=source, run_id=saved.reroute_run_id)) and p["done"] and p,
        timeout=60, what="the re-route run to finish",
    )
    assert progress["status"] == "done" and progress["total"] == 45 and progress["examined"] == 45
    assert progress["auto_decided"] == 30 and progress["kept"] == 15 and progress["percent"] == 100
    assert Item.objects.filter(source=source, state=Item.State.AUTO_DECIDED).count() == 30
    assert Item.objects.filter(source=source, state=Item.State.QUEUED).count() == 15
    assert ReviewTask.objects.filter(source=source, state=ReviewTask.State.CANCELLED).count() == 30
    verbs = list(AuditEvent.objects.filter(correlation_id=saved.reroute_run_id).values_list("verb", flat=True))
    assert verbs[0] == "policy.applied" and "policy.reroute_started" in verbs and verbs[-1] == "policy.reroute_finished"
