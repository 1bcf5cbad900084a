"""Model artifacts stored by content hash, in safe formats (never pickle).

``save_*`` writes ``ARTIFACT_ROOT/<sha256><suffix>`` and returns the hash; the model registry records it.
``load_*`` reads only a file whose bytes hash to the name asked for, and then only through a loader that cannot
run code: skops with an allowlist of scikit-learn, NumPy and SciPy types (``.skops``: model bundles, similarity
indexes), ``torch.load(weights_only=True)`` for a network's state_dict (``.pt``, referenced by hash from its
skops bundle), ``numpy.load(allow_pickle=False)`` for held-out evidence arrays (``.npz``).
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle  # only for its exception type: torch.load(weights_only=True) raises UnpicklingError on refusal
import re
import sys
import tempfile
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from django.conf import settings

from scoring.inference import TrainedModel

SUFFIX = ".skops"
WEIGHTS_SUFFIX = ".pt"
ARRAYS_SUFFIX = ".npz"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Types skops does not trust by default but our bundles legitimately hold (found by saving every family,
# binary and multiclass, isotonic and sigmoid). Anything else is refused, never loaded.
_TRUSTED_PREFIXES = ("sklearn.",)
_TRUSTED_EXACT = frozenset({"numpy.dtype", "scipy.sparse._csr.csr_matrix"})  # the latter: similarity indexes
# scikit-learn's Cython loss objects report their module as plain "_loss".
_TRUSTED_PATTERN = re.compile(r"^_loss\.CyHalf[A-Za-z]+Loss$")


def _skops_io() -> ModuleType:
    """Import skops.io on first use, without torch.

    skops builds its trusted-type list with sklearn's ``all_estimators()``, which walks every sklearn package,
    including ``sklearn.externals.array_api_compat.torch``, and so imports torch when it is installed: seconds
    of start-up and hundreds of MB per process for nothing (no scikit-learn estimator needs it). Hiding torch
    for the duration of that import leaves skops' trusted list unchanged (the walk ignores import errors) and
    keeps web and scoring processes free of torch. A process that already imported torch is left alone.
    """
    if "skops.io" in sys.modules:
        return sys.modules["skops.io"]
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` raise ImportError
    try:
        import skops.io
    finally:
        if hide and sys.modules.get("torch", ...) is None:
            del sys.modules["torch"]
    return skops.io


class ArtifactError(Exception):
    """An artifact is missing, altered, or would construct a type we do not trust."""


def artifact_root() -> Path:
    return Path(settings.ARTIFACT_ROOT)


def artifact_path(sha256: str, suffix: str = SUFFIX) -> Path:
    if not isinstance(sha256, str) or not _SHA256.match(sha256):
        raise ArtifactError(f"not a sha256 hex digest: {sha256!r}")
    return artifact_root() / f"{sha256}{suffix}"


def _is_trusted(type_name: str) -> bool:
    return (
        type_name.startswith(_TRUSTED_PREFIXES)
        or type_name in _TRUSTED_EXACT
        or bool(_TRUSTED_PATTERN.match(type_name))
    )


def save_blob(data: bytes, suffix: str) -> str:
    """Store ``data`` under its hash (atomically; idempotent) and return the hash."""
    digest = hashlib.sha256(data).hexdigest()
    path = artifact_path(digest, suffix)
    if path.exists():
        return digest
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest


def load_blob(sha256: str, suffix: str) -> bytes:
    """The bytes stored under ``sha256``; ArtifactError when missing or when they do not hash to ``sha256``."""
    path = artifact_path(sha256, suffix)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"artifact {sha256}{suffix} is missing from {artifact_root()}") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise ArtifactError(f"artifact {sha256} does not match its content (hash {actual}); refusing to load it")
    return data


def save_artifact(obj: Any) -> str:
    """Serialise ``obj`` with skops, store it under its hash and return the hash."""
    # Deflate: skops' JSON schema is verbose (a TF-IDF vocabulary is MBs stored, ~10x less compressed).
    return save_blob(_skops_io().dumps(obj, compression=zipfile.ZIP_DEFLATED, compresslevel=3), SUFFIX)


def load_artifact(sha256: str) -> Any:
    """The object stored under ``sha256``; ArtifactError when the file is missing, its bytes do not hash to
    ``sha256``, or it names a type outside the allowlist."""
    data = load_blob(sha256, SUFFIX)
    sio = _skops_io()
    try:
        untrusted = sio.get_untrusted_types(data=data)
    except Exception as exc:  # a corrupt or foreign file: report, never load
        raise ArtifactError(f"artifact {sha256} is not a readable skops file: {exc}") from exc
    refused = sorted(t for t in untrusted if not _is_trusted(t))
    if refused:
        raise ArtifactError(f"artifact {sha256} would construct untrusted types: {', '.join(refused)}")
    return sio.loads(data, trusted=list(untrusted))


def save_arrays(arrays: dict[str, np.ndarray]) -> str:
    """Plain numeric arrays as an .npz stored by hash (compressed; no object arrays, so no pickle)."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
    return save_blob(buffer.getvalue(), ARRAYS_SUFFIX)


def load_arrays(sha256: str) -> dict[str, np.ndarray]:
    data = load_blob(sha256, ARRAYS_SUFFIX)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except ValueError as exc:  # object arrays would need pickle: refused
        raise ArtifactError(f"artifact {sha256}{ARRAYS_SUFFIX} is not plain arrays: {exc}") from exc


def save_model(model: TrainedModel) -> str:
    """The model's skops bundle (and, for a network, its state_dict first, whose hash the bundle records)."""
    weights_sha256 = None
    if model.stores_weights:
        from scoring.estimators import get_family

        weights_sha256 = save_blob(get_family(model.algorithm).weights_bytes(model), WEIGHTS_SUFFIX)
    return save_artifact(model.to_bundle(weights_sha256=weights_sha256))


def load_model(sha256: str) -> TrainedModel:
    try:
        bundle = load_artifact(sha256)
        weights = None
        network = bundle.get("network") if isinstance(bundle, dict) else None
        if network is not None:
            weights = load_blob(str(network.get("weights_sha256")), WEIGHTS_SUFFIX)
        return TrainedModel.from_bundle(bundle, weights=weights)
    except ValueError as exc:
        raise ArtifactError(f"artifact {sha256}: {exc}") from exc
    except (RuntimeError, pickle.UnpicklingError, EOFError, KeyError) as exc:
        # torch refusing a state_dict: not weights-only (it would run code), wrong shapes, not a torch file.
        raise ArtifactError(f"artifact {sha256}: weights refused: {type(exc).__name__}: {exc}") from exc
