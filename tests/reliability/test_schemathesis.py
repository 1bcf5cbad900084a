"""schemathesis against the OpenAPI schema the app publishes (/api/schema/): every operation, fuzzed with
generated inputs as an admin, must never answer 5xx. Bounded for CI (SCHEMATHESIS_MAX_EXAMPLES per operation,
more under `make chaos`). Half the generated cases have their path parameters replaced by real rows, so that
the fuzzing reaches the code behind the 404s."""

from __future__ import annotations

import os
from typing import Any

import pytest
import schemathesis
from django.core.wsgi import get_wsgi_application
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings

from tests.conftest import api_client_for
from tests.factories import UserFactory
from tests.reliability.chaos import FULL
from tests.reliability.helpers import record_figures
from tests.security.urlmatrix import make_objects

MAX_EXAMPLES = int(os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "25" if FULL else "4"))


@pytest.mark.django_db(transaction=True)
def test_no_operation_answers_5xx(settings: Any, tmp_path: Any) -> None:
    settings.UPLOAD_ROOT = tmp_path / "uploads"
    settings.EXPORT_ROOT = tmp_path / "exports"
    admin = UserFactory(username="fuzzadmin", role="admin")
    analyst = UserFactory(username="fuzzana", role="analyst")
    objects = make_objects(admin, analyst)
    token = api_client_for(admin)._credentials["HTTP_AUTHORIZATION"]
    real = {"slug": objects["slug"], "pk": objects["model"], **objects["ids"]}

    schema = schemathesis.openapi.from_wsgi("/api/schema/?format=json", get_wsgi_application())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 20, [op.label for op in operations]
    failures: list[tuple[str, int, str]] = []
    calls = 0

    def exercise(operation: Any) -> None:
        counter = {"n": 0}

        @hypothesis_settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            phases=[Phase.explicit, Phase.generate],
        )
        @given(case=operation.as_strategy())
        def run(case: Any) -> None:
            nonlocal calls
            counter["n"] += 1
            if case.path_parameters and counter["n"] % 2 == 0:
                for name in case.path_parameters:
                    if name in real:
                        case.path_parameters[name] = real[name]
            response = case.call(headers={"Authorization": token})
            calls += 1
            if response.status_code >= 500:
                failures.append((operation.label, response.status_code, case.as_curl_command()[:600]))

        run()

    for operation in operations:
        exercise(operation)

    assert failures == [], "\n".join(f"{label} -> {code}\n  {curl}" for label, code, curl in failures)
    record_figures(
        "schemathesis_openapi",
        tried=calls,
        operations=len(operations),
        max_examples=MAX_EXAMPLES,
        server_errors=len(failures),
        lost=0,
        duplicated=0,
    )
