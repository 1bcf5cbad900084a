from django.apps import AppConfig


class ObservabilityConfig(AppConfig):
    name = "reviewapp.observability"
    label = "observability"
    verbose_name = "observability"

    def ready(self) -> None:
        from reviewapp.core.logging import connect_celery_signals

        # Web processes publish tasks (the correlation id header); workers run them (latency, outcomes).
        connect_celery_signals()
