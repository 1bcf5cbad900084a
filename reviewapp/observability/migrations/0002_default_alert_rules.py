"""Default alert rules (editable on the alerts page or in the admin)."""

from django.db import migrations

DEFAULT_RULES = [
    ("queue-age", "queue_age_seconds", 4 * 3600, 24, "The oldest waiting review task is older than 4 hours."),
    ("scoring-lag-p95", "lag_p95_scored_seconds", 15 * 60, 1, "p95 time from received to scored over the last hour."),
    ("decision-lag-p95", "lag_p95_decided_seconds", 24 * 3600, 24, "p95 time from received to first decision."),
    ("drift-psi", "drift_psi", 0.2, 24, "A feature's PSI against the champion's training data is past 0.2."),
    ("failure-rate", "failure_rate", 0.02, 24, "More than 2% of the items received in the last day failed."),
    ("dead-actions", "dead_actions", 0, 24, "An action run was dead-lettered in the last day."),
    ("promise-breach", "promise_breach", 0, 720,
     "QA samples show the auto-decision error above the policy's target_error (at the policy's confidence)."),
]


def create_rules(apps, schema_editor):
    AlertRule = apps.get_model("observability", "AlertRule")
    for name, metric, threshold, window, description in DEFAULT_RULES:
        AlertRule.objects.get_or_create(
            name=name,
            defaults={"metric": metric, "threshold": threshold, "window_hours": window, "description": description},
        )


def remove_rules(apps, schema_editor):
    AlertRule = apps.get_model("observability", "AlertRule")
    AlertRule.objects.filter(name__in=[r[0] for r in DEFAULT_RULES]).delete()


class Migration(migrations.Migration):
    dependencies = [("observability", "0001_initial")]

    operations = [migrations.RunPython(create_rules, remove_rules)]
