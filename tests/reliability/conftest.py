from __future__ import annotations

from typing import Any

import pytest

from tests.factories import UserFactory, make_payments_source


@pytest.fixture
def rel_source(transactional_db: None) -> Any:
    return make_payments_source(slug="rel-payments", thresholds={"legit": 0.9, "fraud": 0.99})


@pytest.fixture
def make_reviewers(transactional_db: None) -> Any:
    def make(n: int, prefix: str = "rev") -> list[Any]:
        return [UserFactory(username=f"{prefix}{i}", role="analyst") for i in range(n)]

    return make
