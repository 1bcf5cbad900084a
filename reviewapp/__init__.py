"""reviewapp: human-in-the-loop review of machine-learning decisions."""

from reviewapp.celery import app as celery_app

__all__ = ["celery_app"]
