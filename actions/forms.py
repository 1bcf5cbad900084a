"""Forms of the actions pages. They parse input; the service validates the action itself."""

from __future__ import annotations

import json
from typing import Any

from django import forms

from actions.models import ActionConfig
from reviewapp.ingest.models import Source


class ActionConfigForm(forms.Form):
    name = forms.CharField(max_length=200)
    kind = forms.ChoiceField(choices=ActionConfig.Kind.choices)
    label = forms.ChoiceField(required=False, help_text="Blank: any label.")
    url = forms.CharField(max_length=2000, required=False, help_text="http or https; not needed for a log action.")
    template = forms.CharField(
        required=False, widget=forms.Textarea(attrs={"rows": 5}),
        help_text='Ticket body as JSON, e.g. {"title": "Review {{external_id}}: {{label}}"}.',
    )
    high_risk = forms.BooleanField(required=False, widget=forms.CheckboxInput(attrs={"style": "width:auto"}),
                                   help_text="A second admin must approve each run.")
    compensating_config = forms.ModelChoiceField(queryset=ActionConfig.objects.none(), required=False,
                                                 help_text="Queued when a decision that acted is overridden.")
    compensation_only = forms.BooleanField(required=False, widget=forms.CheckboxInput(attrs={"style": "width:auto"}),
                                           help_text="Only used as another action's compensation.")
    max_attempts = forms.IntegerField(min_value=1, max_value=50, required=False)
    connect_timeout_seconds = forms.FloatField(min_value=0.1, max_value=30, required=False)
    read_timeout_seconds = forms.FloatField(min_value=0.1, max_value=60, required=False)

    def __init__(self, *args: Any, source: Source, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["label"].choices = [("", "any label")] + [(label, label) for label in source.labels]
        self.fields["compensating_config"].queryset = ActionConfig.objects.filter(source=source)

    def clean_template(self) -> Any:
        raw = (self.cleaned_data.get("template") or "").strip()
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise forms.ValidationError(f"not valid JSON: {exc}") from exc


class RejectForm(forms.Form):
    reason = forms.CharField(max_length=500)
