"""source_create and schema_version_create: validation, versions, initial policy, audit."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from reviewapp.core.errors import ValidationFailed
from reviewapp.core.models import AuditEvent
from reviewapp.demo import payments
from reviewapp.ingest import services
from reviewapp.ingest.models import SchemaVersion, Source
from reviewapp.review.models import Policy

pytestmark = pytest.mark.django_db


def _create(actor: Any, **overrides: Any) -> Source:
    kwargs: dict[str, Any] = {
        "slug": "payments", "name": "Card payments", "labels": ["legit", "fraud"],
        "json_schema": copy.deepcopy(payments.SCHEMA), "id_field": "payment_id", "label_field": "is_fraud",
        "text_fields": ["description"],
    }
    kwargs.update(overrides)
    return services.source_create(actor=actor, **kwargs)


def test_source_create_makes_schema_policy_and_audit(admin_user):
    source = _create(admin_user)
    version = SchemaVersion.objects.get(source=source)
    assert version.label == "1.0"
    assert version.json_schema == payments.SCHEMA
    policy = Policy.objects.get(source=source)
    assert policy.version == 1
    assert policy.thresholds == {"legit": 0.95, "fraud": 0.95}
    assert AuditEvent.objects.filter(verb="source.created", object_id=str(source.pk)).exists()
    assert AuditEvent.objects.filter(verb="policy.created").exists()


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"slug": "Bad Slug!"}, "slug"),
        ({"slug": ""}, "slug"),
        ({"name": "  "}, "name"),
        ({"labels": []}, "labels"),
        ({"labels": "legit,fraud"}, "labels"),
        ({"labels": ["legit", "legit"]}, "labels"),
        ({"labels": ["legit", ""]}, "labels"),
        ({"json_schema": {"type": "nonsense"}}, "schema"),
        ({"json_schema": {"type": "array", "items": {}}}, "schema"),
        ({"json_schema": []}, "schema"),
        ({"id_field": "nope"}, "id_field"),
        ({"label_field": "nope"}, "label_field"),
        ({"text_fields": ["description", "nope"]}, "text_fields"),
    ],
)
def test_source_create_names_the_bad_field(admin_user, overrides, field):
    with pytest.raises(ValidationFailed) as excinfo:
        _create(admin_user, **overrides)
    assert field in {e["field"] for e in excinfo.value.errors}
    assert not Source.objects.exists()


def test_source_create_refuses_a_taken_slug(admin_user):
    _create(admin_user)
    with pytest.raises(ValidationFailed) as excinfo:
        _create(admin_user, name="Again")
    assert excinfo.value.errors[0]["field"] == "slug"
    assert Source.objects.count() == 1


def test_compatible_schema_bumps_minor(admin_user):
    source = _create(admin_user)
    schema = copy.deepcopy(payments.SCHEMA)
    schema["properties"]["channel"] = {"type": "string"}  # new optional field
    schema["properties"]["currency"]["enum"] = [*payments.CURRENCIES, "JPY"]  # widened enum
    schema["properties"]["hour"]["type"] = "number"  # integer -> number widens
    del schema["properties"]["amount"]["maximum"]  # relaxed bound
    version = services.schema_version_create(actor=admin_user, source=source, json_schema=schema, comment="channel")
    assert version.label == "1.1"
    assert AuditEvent.objects.filter(verb="schema.created").exists()


def test_breaking_schema_is_refused_with_every_change_listed(admin_user):
    source = _create(admin_user)
    schema = copy.deepcopy(payments.SCHEMA)
    del schema["properties"]["txn_count_24h"]  # removed property
    schema["required"] = [*schema["required"], "account_age_days"]  # newly required
    schema["properties"]["currency"]["enum"] = ["USD", "EUR"]  # narrowed enum
    schema["properties"]["card_present"]["type"] = "string"  # type change
    schema["properties"]["amount"]["maximum"] = 1000  # tightened bound
    with pytest.raises(ValidationFailed) as excinfo:
        services.schema_version_create(actor=admin_user, source=source, json_schema=schema)
    messages = " | ".join(e["message"] for e in excinfo.value.errors)
    assert "'txn_count_24h' was removed" in messages
    assert "'account_age_days' is now required" in messages
    assert "no longer allows 'GBP'" in messages
    assert "type of 'card_present' changed" in messages
    assert "maximum of 'amount' tightened" in messages
    assert len(excinfo.value.errors) == 5
    assert SchemaVersion.objects.filter(source=source).count() == 1

    version = services.schema_version_create(actor=admin_user, source=source, json_schema=schema, new_major=True)
    assert version.label == "2.0"


def test_schema_version_must_keep_the_id_field(admin_user):
    source = _create(admin_user)
    schema = copy.deepcopy(payments.SCHEMA)
    del schema["properties"]["payment_id"]
    with pytest.raises(ValidationFailed) as excinfo:
        services.schema_version_create(actor=admin_user, source=source, json_schema=schema, new_major=True)
    assert excinfo.value.errors[0]["field"] == "id_field"
