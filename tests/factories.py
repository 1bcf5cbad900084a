"""Factories for the rows most tests need. Domain rows beyond these are made through services."""

from __future__ import annotations

import factory
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group

from reviewapp.core.roles import Role, ensure_role_groups
from reviewapp.demo import payments
from reviewapp.ingest.models import SchemaVersion, Source
from reviewapp.review.models import Policy

User = get_user_model()
PASSWORD = "correct-horse-battery-staple"


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = User
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda u: f"{u.username}@example.com")
    password = factory.PostGenerationMethodCall("set_password", PASSWORD)

    @factory.post_generation
    def role(self, create: bool, extracted: str | None, **kwargs: object) -> None:
        self.save()
        if extracted:
            ensure_role_groups()
            self.groups.add(Group.objects.get(name=Role(extracted).value))


def make_payments_source(
    *, slug: str = "payments", thresholds: dict | None = None, qa_sample_rate: float = 0.0
) -> Source:
    """A source with schema v1.0 and policy v1, as the source_create service makes them."""
    source = Source.objects.create(
        slug=slug,
        name="Card payments",
        labels=list(payments.LABELS),
        id_field=payments.ID_FIELD,
        label_field=payments.LABEL_FIELD,
        text_fields=list(payments.TEXT_FIELDS),
    )
    SchemaVersion.objects.create(source=source, major=1, minor=0, json_schema=payments.SCHEMA)
    Policy.objects.create(
        source=source,
        version=1,
        thresholds=thresholds if thresholds is not None else {"legit": 0.9, "fraud": 0.99},
        qa_sample_rate=qa_sample_rate,
    )
    return source
