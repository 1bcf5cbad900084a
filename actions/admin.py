from django import forms
from django.contrib import admin

from actions.models import ActionConfig, ActionRun, EgressAllowRule
from actions.ssrf import parse_rule


class EgressAllowRuleForm(forms.ModelForm):
    class Meta:
        model = EgressAllowRule
        fields = ["cidr_or_host", "comment"]

    def clean_cidr_or_host(self) -> str:
        try:
            return str(parse_rule(self.cleaned_data["cidr_or_host"]))
        except ValueError as exc:
            raise forms.ValidationError(str(exc)) from exc


@admin.register(EgressAllowRule)
class EgressAllowRuleAdmin(admin.ModelAdmin):
    """The SSRF allow-list: hosts or ranges actions may reach although they are not public."""

    form = EgressAllowRuleForm
    list_display = ("cidr_or_host", "comment", "created_at")


@admin.register(ActionConfig)
class ActionConfigAdmin(admin.ModelAdmin):
    """Actions are created in the app (the secret is shown once there); here they can be switched off
    or tuned. The secret is never displayed."""

    list_display = ("name", "source", "kind", "label", "high_risk", "enabled")
    list_filter = ("kind", "enabled", "high_risk")
    exclude = ("secret",)
    readonly_fields = ("source", "kind", "created_by", "created_at")

    def has_add_permission(self, request):  # type: ignore[no-untyped-def]
        return False


@admin.register(ActionRun)
class ActionRunAdmin(admin.ModelAdmin):
    """Read-only: runs change through approve / reject / replay, which audit every change."""

    list_display = ("id", "decision", "config", "state", "attempts", "last_status_code", "created_at")
    list_filter = ("state", "is_compensation")
    search_fields = ("idempotency_key",)
    readonly_fields = [f.name for f in ActionRun._meta.fields]

    def has_add_permission(self, request):  # type: ignore[no-untyped-def]
        return False

    def has_change_permission(self, request, obj=None):  # type: ignore[no-untyped-def]
        return False
