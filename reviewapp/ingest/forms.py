"""Forms of the ingest pages. They parse text into values; the services decide what is valid."""

from __future__ import annotations

import json
from typing import Any

from django import forms

from reviewapp.ingest.models import IngestBatch


def _split(text: str) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


class SourceForm(forms.Form):
    slug = forms.CharField(max_length=64, help_text="Lowercase letters, digits, '-' and '_'; used in URLs.")
    name = forms.CharField(max_length=200)
    labels = forms.CharField(max_length=2000, help_text="Comma-separated, in display order, e.g. legit, fraud.")
    schema = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 14, "spellcheck": "false"}),
        help_text="A JSON Schema (draft 2020-12) of type object describing one item's payload.",
    )
    id_field = forms.CharField(max_length=100, help_text="The property that identifies an item.")
    label_field = forms.CharField(
        max_length=100, required=False, help_text="Optional: a column of uploads holding known labels."
    )
    text_fields = forms.CharField(max_length=2000, required=False, help_text="Comma-separated free-text properties.")

    def clean_labels(self) -> list[str]:
        labels = _split(self.cleaned_data["labels"])
        if not labels:
            raise forms.ValidationError("Give at least one label.")
        return labels

    def clean_schema(self) -> dict[str, Any]:
        return _json_object(self.cleaned_data["schema"], "schema")

    def clean_text_fields(self) -> list[str]:
        return _split(self.cleaned_data.get("text_fields", ""))


def _json_object(text: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise forms.ValidationError(f"Not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno}).") from exc
    if not isinstance(value, dict):
        raise forms.ValidationError(f"The {what} must be a JSON object.")
    return value


class UploadForm(forms.Form):
    file = forms.FileField(help_text="CSV, JSON Lines or Parquet.", allow_empty_file=True)
    mode = forms.ChoiceField(
        choices=IngestBatch.Mode.choices, initial=IngestBatch.Mode.ALL_OR_NOTHING, widget=forms.RadioSelect
    )
    resend_of = forms.IntegerField(required=False, widget=forms.HiddenInput, min_value=1)


class SampleForm(forms.Form):
    file = forms.FileField(help_text="A sample of the data: CSV, JSON Lines or Parquet. Its first "
                                     "10,000 rows are read; nothing is stored.", allow_empty_file=True)


class SchemaVersionForm(forms.Form):
    schema = forms.CharField(widget=forms.Textarea(attrs={"rows": 18, "spellcheck": "false"}),
                             help_text="The whole new JSON Schema (draft 2020-12).")
    comment = forms.CharField(max_length=500, required=False)
    new_major = forms.BooleanField(required=False, label="Start a new major version (accept breaking changes)")

    def clean_schema(self) -> dict[str, Any]:
        return _json_object(self.cleaned_data["schema"], "schema")
