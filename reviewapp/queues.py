"""Every Celery queue, named once. Workers are started per queue in production."""

from enum import StrEnum


class Queue(StrEnum):
    INGEST = "ingest"
    SCORING = "scoring"
    TRAINING = "training"
    ACTIONS = "actions"
    EXPORTS = "exports"
    MAINTENANCE = "maintenance"


ALL_QUEUES: tuple[str, ...] = tuple(q.value for q in Queue)
