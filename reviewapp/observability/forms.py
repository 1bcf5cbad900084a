from __future__ import annotations

from django import forms

from reviewapp.observability.models import AlertRule


class AlertRuleForm(forms.ModelForm):
    class Meta:
        model = AlertRule
        fields = ["threshold", "window_hours", "enabled"]
        widgets = {"threshold": forms.NumberInput(attrs={"step": "any"})}


class DriftComputeForm(forms.Form):
    window_days = forms.IntegerField(min_value=1, max_value=365, initial=7, label="Recent window (days)")
