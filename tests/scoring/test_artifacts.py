"""Artifacts: stored by content hash in skops format; anything that does not match is refused."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from reviewapp.demo import payments
from scoring.artifacts import ArtifactError, artifact_path, load_artifact, load_model, save_artifact, save_model
from scoring.features import feature_spec_from_schema, frame_from_payloads
from scoring.inference import predict
from scoring.similarity import build_index
from scoring.training import train

ROOT = Path(__file__).resolve().parents[2]


class NotAModel:
    """A type skops does not trust and our allowlist does not know."""

    def __init__(self) -> None:
        self.value = 1


@pytest.fixture(scope="module")
def model_and_frame():
    df = payments.generate_payments(1500, seed=5)
    spec = feature_spec_from_schema(payments.SCHEMA, id_field=payments.ID_FIELD, label_field=payments.LABEL_FIELD,
                                    text_fields=payments.TEXT_FIELDS)
    frame = frame_from_payloads(df.to_dict(orient="records"), spec)
    return train(frame, df[payments.LABEL_FIELD].tolist(), list(payments.LABELS), spec), frame


@pytest.mark.parametrize("algorithm", ["logreg", "hgb"])
def test_round_trip_by_hash(artifact_root: Path, model_and_frame, algorithm: str) -> None:
    model, frame = model_and_frame
    if algorithm != model.algorithm:
        model = train(frame, _labels(), list(payments.LABELS), model.spec, algorithm=algorithm)
    sha = save_model(model)
    path = artifact_root / f"{sha}.skops"
    assert path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == sha
    loaded = load_model(sha)
    labels = list(payments.LABELS)
    part = frame.iloc[:50]
    assert predict(loaded, part, labels, explain=True) == predict(model, part, labels, explain=True)
    assert loaded.spec == model.spec and loaded.conformal == model.conformal


def _labels() -> list[str]:
    return payments.generate_payments(1500, seed=5)[payments.LABEL_FIELD].tolist()


def test_altered_artifact_is_refused(artifact_root: Path, model_and_frame) -> None:
    sha = save_model(model_and_frame[0])
    path = artifact_path(sha)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match"):
        load_model(sha)


def test_other_file_under_the_name_is_refused(artifact_root: Path, model_and_frame) -> None:
    sha_a = save_model(model_and_frame[0])
    sha_b = save_artifact({"format": 0})
    # Swap: the file named A now holds B's bytes (a valid skops file, just not the one registered).
    artifact_path(sha_a).write_bytes(artifact_path(sha_b).read_bytes())
    with pytest.raises(ArtifactError, match="does not match"):
        load_artifact(sha_a)


def test_missing_and_malformed_names(artifact_root: Path) -> None:
    with pytest.raises(ArtifactError, match="missing"):
        load_artifact("0" * 64)
    for bad in ("../../etc/passwd", "abc", "A" * 64, ""):
        with pytest.raises(ArtifactError, match="not a sha256"):
            load_artifact(bad)


def test_untrusted_types_are_refused(artifact_root: Path) -> None:
    sha = save_artifact({"payload": NotAModel()})
    with pytest.raises(ArtifactError, match=r"untrusted types: tests\.scoring\.test_artifacts\.NotAModel"):
        load_artifact(sha)


def test_not_a_bundle_is_refused(artifact_root: Path) -> None:
    sha = save_artifact({"format": 99})
    with pytest.raises(ArtifactError, match="not a model bundle"):
        load_model(sha)


def test_web_processes_never_import_torch(artifact_root: Path, model_and_frame) -> None:
    """The whole web stack, the pages that list model families (torch ones included), loading scikit-learn models
    and a similarity index, and the services a review screen calls: torch stays out of the process. (skops walks
    every sklearn package, one of which imports torch; our loader keeps it out.)"""
    model, frame = model_and_frame
    sha = save_model(model)
    labels = _labels()
    index_sha = save_artifact(build_index(frame, labels, list(range(len(labels))), model.spec, list(payments.LABELS)))
    code = (
        "import os, sys, django\n"
        "os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'reviewapp.settings')\n"
        "django.setup()\n"
        "import reviewapp.urls, reviewapp.wsgi, scoring.views, scoring.api, scoring.services, scoring.tasks\n"
        "from django.urls import get_resolver\n"
        "for p in get_resolver().url_patterns: getattr(p, 'url_patterns', None)\n"
        "import reviewapp.review.views, reviewapp.review.api, reviewapp.ingest.views, reviewapp.ingest.api\n"
        "assert 'torch' not in sys.modules, 'web code imported torch'\n"
        "assert 'skops.io' not in sys.modules, 'web code imported skops'\n"
        "from scoring.views import _algorithm_choices\n"
        "names = [a['name'] for a in _algorithm_choices()]\n"
        "assert 'torch_mlp' in names and 'torch_text' in names, names\n"
        "assert 'torch' not in sys.modules, 'listing model families imported torch'\n"
        f"from scoring.artifacts import load_model, load_artifact; load_model({sha!r}); load_artifact({index_sha!r})\n"
        "assert 'torch' not in sys.modules, 'loading a model or an index imported torch'\n"
    )
    env = {"REVIEWAPP_ENV": "test", "ARTIFACT_ROOT": str(artifact_root), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
