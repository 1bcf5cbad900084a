"""Forms of the review pages: they parse and validate; the views call services with the result."""

from __future__ import annotations

from typing import Any

from django import forms

from reviewapp.ingest.models import Source
from reviewapp.review.selectors import QueueFilters
from reviewapp.review.services import ADJUDICATION_QUEUE, REVIEW_QUEUE

AGE_CHOICES = [("", "Any age"), ("1", "1 hour or more"), ("4", "4 hours or more"), ("24", "1 day or more"),
               ("72", "3 days or more"), ("168", "7 days or more")]
KIND_CHOICES = [("", "Reviews and QA"), ("review", "Reviews only"), ("qa", "QA samples"),
                ("escalation", "Escalated"), ("adjudication", "Disagreements"), ("all", "Everything waiting")]
SORT_CHOICES = [("priority", "Policy priority"), ("oldest", "Oldest first")]
QUEUE_CHOICES = [(REVIEW_QUEUE, "Review"), (ADJUDICATION_QUEUE, "Escalations and disagreements")]
STATS_DAYS = [("7", "Last 7 days"), ("30", "Last 30 days"), ("90", "Last 90 days"), ("all", "All time")]



def _source_or_none(slug: str | None) -> Source | None:
    if not slug:
        return None
    return Source.objects.filter(slug=slug).first()


class QueueFilterForm(forms.Form):
    source = forms.SlugField(required=False, max_length=64)
    label = forms.CharField(required=False, max_length=100)
    min_confidence = forms.FloatField(required=False, min_value=0, max_value=1, label="Confidence from")
    max_confidence = forms.FloatField(required=False, min_value=0, max_value=1, label="to")
    age = forms.ChoiceField(required=False, choices=AGE_CHOICES, label="Waiting")
    batch = forms.IntegerField(required=False, min_value=1)
    kind = forms.ChoiceField(required=False, choices=KIND_CHOICES)
    sort = forms.ChoiceField(required=False, choices=SORT_CHOICES)
    after = forms.CharField(required=False, max_length=400)

    def clean_source(self) -> Source | None:
        slug = self.cleaned_data.get("source")
        if not slug:
            return None
        source = _source_or_none(slug)
        if source is None:
            raise forms.ValidationError("Unknown source.")
        return source

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        low, high = data.get("min_confidence"), data.get("max_confidence")
        if low is not None and high is not None and low > high:
            self.add_error("max_confidence", "must not be below the lower bound")
        return data

    def filters(self) -> QueueFilters:
        """The valid filters (an invalid form filters nothing and shows its errors)."""
        if not self.is_bound or not self.is_valid():
            return QueueFilters()
        d = self.cleaned_data
        return QueueFilters(
            source=d.get("source"), label=d.get("label") or "", min_confidence=d.get("min_confidence"),
            max_confidence=d.get("max_confidence"), min_age_hours=float(d["age"]) if d.get("age") else None,
            batch_id=d.get("batch"), kind=d.get("kind") or "", sort=d.get("sort") or "priority",
        )


class ClaimForm(forms.Form):
    source = forms.SlugField(required=False, max_length=64)
    include_skipped = forms.BooleanField(required=False)
    queue = forms.ChoiceField(required=False, choices=QUEUE_CHOICES)

    def clean_source(self) -> Source | None:
        return _source_or_none(self.cleaned_data.get("source"))

    def clean_queue(self) -> str:
        return self.cleaned_data.get("queue") or REVIEW_QUEUE


class VerdictForm(ClaimForm):
    label = forms.CharField(max_length=100)
    note = forms.CharField(required=False, max_length=5000)
    idempotency_key = forms.CharField(required=False, max_length=100)
    handling_ms = forms.IntegerField(required=False, min_value=0, max_value=24 * 3600 * 1000)


class EscalateForm(ClaimForm):
    note = forms.CharField(required=False, max_length=5000)


class UndoForm(ClaimForm):
    verdict = forms.IntegerField(required=False, min_value=1)
    current_item = forms.IntegerField(required=False, min_value=1)


class IntListField(forms.Field):
    """Repeated ``name=<int>`` parameters (checkboxes of the queue table) as a list of ints."""

    widget = forms.MultipleHiddenInput

    def to_python(self, value: Any) -> list[int]:
        if not value:
            return []
        try:
            return [int(v) for v in value]
        except (TypeError, ValueError) as exc:
            raise forms.ValidationError("Invalid selection.") from exc


class BulkVerdictForm(forms.Form):
    item = IntListField(required=True, error_messages={"required": "Select at least one item."})
    label = forms.CharField(max_length=100)
    note = forms.CharField(required=False, max_length=5000)
    confirm = forms.BooleanField(required=False)


class StatsForm(forms.Form):
    days = forms.ChoiceField(required=False, choices=STATS_DAYS)
    source = forms.SlugField(required=False, max_length=64)

    def clean_source(self) -> Source | None:
        return _source_or_none(self.cleaned_data.get("source"))
