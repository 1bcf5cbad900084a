"""Concurrency on PostgreSQL: many reviewers claiming at once, two verdicts racing for one item, and
claim / verdict / lease expiry interleaved in every order. Threads hold their own database connections,
so the row locks (SELECT ... FOR UPDATE SKIP LOCKED) are exercised for real."""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest
from django.conf import settings
from django.db.models import Count, F
from django.utils import timezone

from reviewapp.core.errors import Conflict
from reviewapp.core.models import AuditEvent
from reviewapp.ingest.models import Item
from reviewapp.review.models import Decision, Label, ReviewTask, Verdict
from reviewapp.review.services import leases_release_expired, task_claim_next, verdict_submit
from tests.conftest import api_client_for
from tests.reliability.helpers import in_thread, make_review_items, record_figures, run_together

pytestmark = pytest.mark.skipif(not settings.IS_POSTGRES, reason="row locks need PostgreSQL")

REVIEWERS = 64
PER_REVIEWER = 6
RACE_TRIALS = 1000
API_RACE_TRIALS = 100
RACE_PAIRS = 4


def test_64_reviewers_claim_concurrently_without_double_claims(rel_source: Any, make_reviewers: Any) -> None:
    reviewers = make_reviewers(REVIEWERS)
    pairs = make_review_items(rel_source, REVIEWERS * PER_REVIEWER)
    task_ids = {t for _, t in pairs}
    seen: dict[int, list[int]] = {}

    def work(user: Any) -> list[int]:
        # Claim, answer, claim again until the queue is empty: every claim races 63 others.
        got: list[int] = []
        while True:
            task = task_claim_next(user=user, source=rel_source)
            if task is None:
                return got
            got.append(task.pk)
            verdict_submit(user=user, item=task.item, label="legit")

    started = time.monotonic()
    results = run_together([lambda u=u: work(u) for u in reviewers])
    elapsed = time.monotonic() - started
    for user, got in zip(reviewers, results, strict=True):
        seen[user.pk] = got
    claimed = [t for got in seen.values() for t in got]
    doubles = [t for t, n in Counter(claimed).items() if n > 1]
    assert doubles == []
    assert set(claimed) == task_ids  # nothing left behind
    assert sum(1 for got in seen.values() if got) > REVIEWERS // 2  # the work really was spread out
    # The database agrees: one claim event and one verdict per task, every item decided once.
    claim_events = Counter(
        AuditEvent.objects.filter(verb="task.claimed", object_type="review_task")
        .values_list("object_id", flat=True)
    )
    assert all(n == 1 for n in claim_events.values()) and len(claim_events) == len(task_ids)
    per_task = Verdict.objects.filter(task_id__in=task_ids).values("task_id").annotate(n=Count("id"))
    assert {row["n"] for row in per_task} == {1} and len(per_task) == len(task_ids)
    assert set(Item.objects.filter(pk__in=[i for i, _ in pairs]).values_list("state", flat=True)) == {"decided"}
    record_figures("concurrent_claims", tried=len(task_ids), reviewers=REVIEWERS, double_claims=len(doubles),
                   lost=len(task_ids - set(claimed)), duplicated=0, seconds=round(elapsed, 1))


def _race(item_ids: list[int], answer: Any, *, pairs: int = RACE_PAIRS) -> Counter[tuple[Any, ...]]:
    """Two threads (two tabs of one reviewer) answer each item at the same instant with different labels;
    ``pairs`` such duels run side by side on disjoint items. Returns the sorted outcome pairs."""
    shares = [item_ids[k::pairs] for k in range(pairs)]
    barriers = [threading.Barrier(2) for _ in range(pairs)]

    def racer(share: int, label: str) -> list[Any]:
        results = []
        for item_id in shares[share]:
            barriers[share].wait()
            results.append(answer(item_id, label))
        return results

    outcomes: Counter[tuple[Any, ...]] = Counter()
    with ThreadPoolExecutor(max_workers=2 * pairs) as pool:
        futures = [(pool.submit(in_thread(racer), k, "legit"), pool.submit(in_thread(racer), k, "fraud"))
                   for k in range(pairs)]
        for first, second in futures:
            outcomes.update(tuple(sorted(pair)) for pair in zip(first.result(), second.result(), strict=True))
    return outcomes


def _assert_one_winner_each(item_ids: list[int]) -> None:
    per_item = Verdict.objects.filter(item_id__in=item_ids).values("item_id").annotate(n=Count("id"))
    assert len(per_item) == len(item_ids) and {row["n"] for row in per_item} == {1}
    current = Decision.objects.filter(item_id__in=item_ids, is_current=True)
    assert current.count() == len(item_ids)
    assert Label.objects.filter(item_id__in=item_ids, is_active=True).count() == len(item_ids)
    # The decision carries the winner's label, never a mix of the two answers.
    assert not current.exclude(label=F("verdict__label")).exists()
    assert set(Item.objects.filter(pk__in=item_ids).values_list("state", flat=True)) == {"decided"}


def test_two_verdicts_racing_for_one_item_have_exactly_one_winner(rel_source: Any, make_reviewers: Any) -> None:
    """1,000 trials through the service the API calls: one verdict created, the other a Conflict (409)."""
    (user,) = make_reviewers(1, prefix="racer")
    item_ids = [i for i, _ in make_review_items(rel_source, RACE_TRIALS, claimed_by=user)]
    items = {i.pk: i for i in Item.objects.filter(pk__in=item_ids).select_related("source")}

    def answer(item_id: int, label: str) -> str:
        try:
            verdict_submit(user=user, item=items[item_id], label=label)
        except Conflict:
            return "409"
        return "201"

    started = time.monotonic()
    outcomes = _race(item_ids, answer)
    elapsed = time.monotonic() - started
    assert outcomes == Counter({("201", "409"): RACE_TRIALS}), outcomes
    _assert_one_winner_each(item_ids)
    record_figures("verdict_race", tried=RACE_TRIALS, winners=outcomes[("201", "409")], duplicated=0, lost=0,
                   seconds=round(elapsed, 1))


def test_two_verdicts_racing_through_the_api_get_201_and_409(rel_source: Any, make_reviewers: Any) -> None:
    (user,) = make_reviewers(1, prefix="apiracer")
    item_ids = [i for i, _ in make_review_items(rel_source, API_RACE_TRIALS, claimed_by=user)]
    clients: dict[int, Any] = {}

    def answer(item_id: int, label: str) -> int:
        client = clients.setdefault(threading.get_ident(), api_client_for(user))
        return client.post(f"/api/v1/items/{item_id}/verdicts/", {"label": label}, format="json").status_code

    outcomes = _race(item_ids, answer)
    assert outcomes == Counter({(201, 409): API_RACE_TRIALS}), outcomes
    _assert_one_winner_each(item_ids)


# --- claim, verdict and lease expiry in every order ---------------------------------------------------

OPERATIONS = ("claim", "verdict", "expire")


def _expected(order: tuple[str, ...]) -> dict[str, Any]:
    """A reference model. A holds the claim at the start; B claims; A answers; expiry = A's lease runs
    out and the reaper runs. Returns each operation's outcome and the final item state."""
    holder, decided, outcomes = "A", False, {}
    for op in order:
        if op == "claim":
            ok = holder is None and not decided
            outcomes[op] = "claimed" if ok else "nothing"
            holder = "B" if ok else holder
        elif op == "verdict":
            ok = holder == "A"
            outcomes[op] = "201" if ok else "409"
            if ok:
                holder, decided = None, True
        else:
            outcomes[op] = "released" if holder == "A" else "none"
            holder = None if holder == "A" else holder
    state = "decided" if decided else ("in_review" if holder else "queued")
    return {"outcomes": outcomes, "state": state, "holder": holder}


@pytest.mark.parametrize("order", list(itertools.permutations(OPERATIONS)), ids="-".join)
def test_claim_verdict_and_lease_expiry_interleaved(rel_source: Any, make_reviewers: Any,
                                                    order: tuple[str, ...]) -> None:
    a, b = make_reviewers(2, prefix=f"perm{'-'.join(order)}")
    ((item_id, task_id),) = make_review_items(rel_source, 1, claimed_by=a)
    client_a = api_client_for(a)
    outcomes: dict[str, str] = {}
    for op in order:
        if op == "claim":
            task = task_claim_next(user=b, source=rel_source)
            outcomes[op] = "claimed" if task is not None else "nothing"
        elif op == "verdict":
            status = client_a.post(f"/api/v1/items/{item_id}/verdicts/", {"label": "fraud"}, format="json")
            outcomes[op] = str(status.status_code)
        else:
            # The lease runs out: move it into the past (no sleeping), then the reaper runs.
            ReviewTask.objects.filter(pk=task_id, state="claimed", claimed_by=a).update(
                lease_expires_at=timezone.now() - timedelta(seconds=1))
            outcomes[op] = "released" if leases_release_expired() else "none"
    expected = _expected(order)
    assert outcomes == expected["outcomes"]
    item = Item.objects.get(pk=item_id)
    task = ReviewTask.objects.get(pk=task_id)
    assert item.state == expected["state"]
    holder = {a.pk: "A", b.pk: "B"}.get(task.claimed_by_id) if task.state == "claimed" else None
    assert holder == expected["holder"]
    # Consistency whatever the order: one verdict at most, a decision exactly when decided, a lease on a claim.
    verdicts = Verdict.objects.filter(item_id=item_id).count()
    assert verdicts == (1 if item.state == "decided" else 0)
    assert Decision.objects.filter(item_id=item_id, is_current=True).count() == verdicts
    assert (task.state == "claimed") == (item.state == "in_review")
    if task.state == "claimed":
        assert task.lease_expires_at and task.lease_expires_at > timezone.now()
    if item.state == "decided":
        assert task.state == "done"
    # A late verdict after the order is played out is refused the same way (never a second decision).
    if item.state == "decided":
        with pytest.raises(Conflict):
            verdict_submit(user=a, item=item, label="legit")
