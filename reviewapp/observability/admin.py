from django.contrib import admin
from django.http import HttpRequest

from reviewapp.observability.models import AlertRule, DriftReport, TaskStat


@admin.register(AlertRule)
class AlertRuleAdmin(admin.ModelAdmin):
    list_display = ("name", "metric", "source", "threshold", "window_hours", "enabled", "firing", "last_value")
    list_filter = ("metric", "enabled", "firing")
    readonly_fields = ("firing", "firing_since", "last_value", "last_detail", "last_evaluated_at", "created_at")


@admin.register(DriftReport)
class DriftReportAdmin(admin.ModelAdmin):
    list_display = ("id", "source", "computed_at", "status", "max_psi", "top_feature", "n_recent", "n_reference")
    list_filter = ("status", "source")

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(TaskStat)
class TaskStatAdmin(admin.ModelAdmin):
    list_display = ("task", "runs", "successes", "failures", "retries", "last_run_at", "last_failure_at")

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False
