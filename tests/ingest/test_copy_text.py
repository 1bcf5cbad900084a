"""The COPY text of a bulk chunk: escapes, labels and the resume filter, and the round trip through PostgreSQL."""

from __future__ import annotations

from collections import Counter

import pytest

from reviewapp.ingest import bulk, services
from reviewapp.ingest.columnar import Checked, GoodRows
from reviewapp.ingest.models import Item
from tests.ingest.conftest import payments_frame, to_bytes, upload

HOSTILE = ["a\nb", "c\r\nd", 'q"uote', "back\\slash", "tab\there", "\\N", "\\\\t", "é ü 中", "\u2028", "plain"]
ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def reference(good: GoodRows, after: int) -> tuple[str, int, int]:
    """The COPY text format written out the slow, obvious way."""
    lines, labeled = [], 0
    for number, external_id, payload, digest, label in zip(good.numbers, good.external_ids, good.payloads,
                                                           good.digests, good.labels, strict=True):
        if number <= after:
            continue
        labeled += label is not None
        tag = "\\N" if label is None else label.translate(ESCAPES)
        lines.append(f"{number}\t{external_id.translate(ESCAPES)}\t{payload.translate(ESCAPES)}\t{digest}\t{tag}\n")
    return "".join(lines), len(lines), labeled


def checked(good: GoodRows) -> Checked:
    return Checked(received=len(good), good=good, bad=[], drift=Counter())


@pytest.mark.parametrize("after", [0, 3, 7, 100])
@pytest.mark.parametrize("hostile", [True, False])
def test_copy_text_matches_the_format(after: int, hostile: bool) -> None:
    texts = HOSTILE if hostile else ["x", "y", "z"]
    n = 12
    good = GoodRows(
        numbers=list(range(1, n + 1)),
        external_ids=[f"id-{i}-{texts[i % len(texts)]}" for i in range(n)],
        payloads=[f'{{"d": "{texts[(i + 3) % len(texts)]}"}}' for i in range(n)],
        digests=[f"{i:064x}" for i in range(n)],
        labels=[None if i % 3 == 0 else texts[i % len(texts)] for i in range(n)],
    )
    assert bulk.copy_text(checked(good), after=after) == reference(good, after)


def test_copy_text_of_an_empty_chunk() -> None:
    assert bulk.copy_text(checked(GoodRows())) == ("", 0, 0)


@pytest.mark.django_db
def test_hostile_texts_arrive_unchanged_through_the_bulk_path(admin_user, source) -> None:
    frame = payments_frame(len(HOSTILE) * 3)
    frame["description"] = [HOSTILE[i % len(HOSTILE)] for i in range(len(frame))]
    frame["payment_id"] = [f"p\\{i}\tx" if i % 2 else f"p{i}" for i in range(len(frame))]
    batch, _ = services.batch_submit(actor=admin_user, source=source,
                                     uploaded_file=upload(to_bytes(frame, "csv"), "hostile.csv"))
    services.batch_process(batch_id=batch.pk)
    batch.refresh_from_db()
    assert (batch.status, batch.accepted) == ("done", len(frame)), batch.error
    stored = {item.external_id: item.payload["description"] for item in Item.objects.filter(batch=batch)}
    assert stored == dict(zip(frame["payment_id"], frame["description"], strict=True))
