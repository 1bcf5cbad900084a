from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from scoring.services import model_cache_clear


@pytest.fixture(autouse=True)
def _fresh_model_cache() -> None:
    # Version ids repeat across tests (rolled-back transactions), so a cached model could outlive its row.
    model_cache_clear()


@pytest.fixture
def artifact_root(settings: Any, tmp_path: Path) -> Path:
    settings.ARTIFACT_ROOT = tmp_path / "artifacts"
    return settings.ARTIFACT_ROOT
