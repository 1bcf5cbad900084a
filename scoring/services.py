"""Writes for the model registry and the scoring path: the Django edge around the pure ML core."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import Counter, OrderedDict
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import numpy as np
from celery import current_app
from django.conf import settings
from django.db import InterfaceError, OperationalError, connection, transaction
from django.db.models import Max, OuterRef, Subquery
from django.utils import timezone
from kombu.exceptions import OperationalError as BrokerError

from reviewapp.core.audit import AuditEntry, audit_record, audit_record_many
from reviewapp.core.errors import Conflict, ValidationFailed
from reviewapp.ingest.models import Item, Source
from reviewapp.ingest.pgcopy import copy_stage, id_array, id_set
from scoring import conf, selectors
from scoring.artifacts import (
    ArtifactError,
    load_arrays,
    load_artifact,
    load_model,
    save_arrays,
    save_artifact,
    save_model,
)
from scoring.estimators import algorithm_names
from scoring.features import feature_spec_from_schema, frame_from_payloads
from scoring.inference import PredictionRow, TrainedModel, explain_rows, limit_threads, predict
from scoring.models import ModelVersion, Prediction
from scoring.risk_control import choose_thresholds
from scoring.similarity import build_index
from scoring.similarity import query as similarity_query
from scoring.training import (
    MIN_LABELS,
    MIN_PER_CLASS,
    SPLIT,
    crossfit_evidence,
    evaluate,
    evaluate_on,
    heldout_evidence,
    train,
)

logger = logging.getLogger(__name__)

NO_MODEL_REASON = "no model yet: every item goes to review"
SCORE_TASK = "scoring.score_items"
TRAIN_TASK = "scoring.train_model"
TRANSIENT_DB_ERRORS = (OperationalError, InterfaceError)
STARTED_KEY = "task_started_at"


def _send(name: str, kwargs: dict[str, Any]) -> bool:
    """Publish one task after commit. A broker outage is logged, not raised: the row is committed and the
    reconcilers send the work again, so an outage costs latency, never data."""
    try:
        current_app.send_task(name, kwargs=kwargs)
    except (BrokerError, OSError) as exc:
        logger.warning("broker unavailable, %s not sent (%s); the reconciler will retry", name, exc)
        return False
    return True


def _actor(actor: Any | None) -> Any | None:
    return actor if getattr(actor, "pk", None) else None


def model_version_summary(mv: ModelVersion) -> dict[str, Any]:
    """The registry facts an audit event records about a version."""
    metrics = mv.metrics or {}
    return {
        "id": mv.pk,
        "source": mv.source_id,
        "version": mv.version,
        "algorithm": mv.algorithm,
        "status": mv.status,
        "is_champion": mv.is_champion,
        "is_shadow": mv.is_shadow,
        "trigger": mv.trigger,
        "artifact_sha256": mv.artifact_sha256,
        "macro_f1": metrics.get("macro_f1"),
        "ece": metrics.get("ece"),
    }


# --- Training -------------------------------------------------------------------------------------


def _validate_algorithm(algorithm: str) -> None:
    if algorithm not in algorithm_names():
        raise ValidationFailed(
            "Unknown algorithm.",
            [{"field": "algorithm", "message": f"{algorithm!r} is not one of {', '.join(algorithm_names())}"}],
        )


def _version_create(*, source: Source, actor: Any | None, algorithm: str, trigger: str) -> ModelVersion:
    with transaction.atomic():
        # Lock the source so concurrent requests get consecutive version numbers.
        Source.objects.select_for_update().filter(pk=source.pk).first()
        number = (ModelVersion.objects.filter(source=source).aggregate(m=Max("version"))["m"] or 0) + 1
        mv = ModelVersion.objects.create(
            source=source, version=number, algorithm=algorithm, status=ModelVersion.Status.TRAINING,
            created_by=_actor(actor), trigger=trigger[:32],
            label_watermark=selectors.label_watermark(source=source),
        )
        audit_record(actor=actor, verb="model.training_started", object_type="model_version", object_id=mv.pk,
                     after={**model_version_summary(mv), "label_watermark": mv.label_watermark})
    return mv


def model_training_start(
    *, source: Source, actor: Any | None, algorithm: str = "logreg", trigger: str = "manual"
) -> ModelVersion:
    """Record a version in status ``training`` and hand it to a training worker after commit."""
    _validate_algorithm(algorithm)
    with transaction.atomic():
        mv = _version_create(source=source, actor=actor, algorithm=algorithm, trigger=trigger)
        transaction.on_commit(lambda: _send(TRAIN_TASK, {"model_version_id": mv.pk}))
    return mv


def _label_snapshot(rows: list[selectors.TrainingRow], skipped: int, *, fit_rows: int) -> dict[str, Any]:
    """Which labels trained the version, with a hash over (item, label) in time order. ``fit_until`` is the
    time-order position of the last row the model or its calibrator saw: later rows are held out for it."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(f"{row.item_id}\t{row.label}\n".encode())
    last_seen = rows[fit_rows - 1] if 0 < fit_rows <= len(rows) else None
    return {
        "count": len(rows),
        "min_label_id": min((r.label_id for r in rows), default=None),
        "max_label_id": max((r.label_id for r in rows), default=None),
        "sha256": digest.hexdigest(),
        "per_label": dict(Counter(r.label for r in rows)),
        "per_origin": dict(Counter(r.origin for r in rows)),
        "skipped_outside_label_set": skipped,
        "fit_until": list(last_seen.order_key) if last_seen else None,
    }


def _version_fail(*, model_version_id: int, actor: Any | None, reason: str) -> ModelVersion:
    with transaction.atomic():
        mv = ModelVersion.objects.select_for_update().get(pk=model_version_id)
        if mv.status != ModelVersion.Status.TRAINING:
            return mv
        mv.status = ModelVersion.Status.FAILED
        mv.error = reason[:5000]
        mv.save(update_fields=["status", "error"])
        audit_record(actor=actor, verb="model.failed", object_type="model_version", object_id=mv.pk,
                     after={**model_version_summary(mv), "error": mv.error})
    return mv


def model_version_mark_failed(*, model_version_id: int, reason: str) -> ModelVersion | None:
    """For a training task that died (time limit, retries exhausted): the version must not stay ``training``."""
    if not ModelVersion.objects.filter(pk=model_version_id).exists():
        return None
    return _version_fail(model_version_id=model_version_id, actor=None, reason=reason)


MIN_COMPARISON_LABELS = 30


def _compare_with_champion(
    *, champion: ModelVersion | None, candidate: TrainedModel, rows: list[selectors.TrainingRow],
    label_set: list[str],
) -> dict[str, Any] | None:
    """Candidate and champion measured on the same rows: the candidate's held-out (newest) labels, minus any
    the champion was fitted or calibrated on (it trained on an older snapshot; rows up to its ``fit_until``
    would flatter it). Both are judged on exactly the same labels, in the same time-ordered split."""
    if champion is None:
        return None
    boundary = (champion.label_snapshot or {}).get("fit_until")
    positions = [i for i, row_index in enumerate(candidate.test_index)
                 if boundary is None or list(rows[row_index].order_key) > list(boundary)]
    held_out = [rows[candidate.test_index[i]] for i in positions]
    out: dict[str, Any] = {
        "champion_id": champion.pk,
        "champion_version": champion.version,
        "n": len(held_out),
        "n_candidate_heldout": len(candidate.test_index),
        "excluded_seen_by_champion": len(candidate.test_index) - len(held_out),
    }
    labels = [r.label for r in held_out]
    if len(held_out) < MIN_COMPARISON_LABELS or len(set(labels)) < 2:
        out["error"] = (f"only {len(held_out)} held-out labels ({len(set(labels))} classes) that the champion did not "
                        "train on; not enough to compare")
        return out
    assert candidate.test_proba is not None
    cand = evaluate(candidate.test_proba[positions], labels, label_set)
    out["candidate_macro_f1"] = cand["macro_f1"]
    out["candidate_ece"] = cand["ece"]
    out["candidate_log_loss"] = cand["log_loss"]
    try:
        model = _cached_model(champion)
        frame = frame_from_payloads([r.payload for r in held_out], model.spec)
        metrics = evaluate_on(model, frame, labels, label_set)
    except (ArtifactError, ValueError, KeyError, TypeError) as exc:
        out["error"] = f"could not evaluate the champion: {exc}"
        return out
    out["champion_macro_f1"] = metrics["macro_f1"]
    out["champion_ece"] = metrics["ece"]
    out["champion_log_loss"] = metrics["log_loss"]
    return out


def _promotion_decision(
    *, promote: bool | None, champion: ModelVersion | None, comparison: dict[str, Any] | None
) -> tuple[bool, str]:
    """Promote automatically only when the candidate's macro-F1 reaches the champion's plus the configured
    margin on the same held-out labels, and its calibration (ECE) is no worse (within the configured slack)."""
    if promote is True:
        return True, "promoted on request"
    if promote is False:
        return False, "not promoted: training was asked not to promote"
    if champion is None or comparison is None:
        return True, "first model of the source"
    if "error" in comparison:
        return False, f"not promoted automatically: {comparison['error']}; waits for an ML engineer"
    margin = float(conf.get("PROMOTION_MIN_MACRO_F1_GAIN"))
    slack = float(conf.get("PROMOTION_MAX_ECE_INCREASE"))
    cand, champ = comparison["candidate_macro_f1"], comparison["champion_macro_f1"]
    where = f"on the same {comparison['n']} held-out labels"
    if cand < champ + margin:
        need = f" + margin {margin:g}" if margin else ""
        return False, (f"macro-F1 {cand:.4f} below champion v{champion.version} ({champ:.4f}{need}) {where}; "
                       "waits for an ML engineer")
    cand_ece, champ_ece = comparison.get("candidate_ece"), comparison.get("champion_ece")
    if cand_ece is not None and champ_ece is not None and cand_ece > champ_ece + slack + 1e-12:
        return False, (f"macro-F1 {cand:.4f} reaches champion v{champion.version} ({champ:.4f}) but calibration is "
                       f"worse (ECE {cand_ece:.4f} against {champ_ece:.4f}) {where}; waits for an ML engineer")
    better = "better than" if cand > champ + margin else "not worse than"
    return True, (f"macro-F1 {cand:.4f} {better} champion v{champion.version} ({champ:.4f}) with ECE no worse "
                  f"{where}")


TIME_SPLIT_SOURCE = "the newest 20% of the time-ordered labels, held out from fitting and calibration"
# What a stored risk-control record says about its evidence, carried over when thresholds are recomputed.
PROVENANCE_KEYS = ("source", "labels", "crossfit", "assumption", "crossfit_skipped")


def _risk_control_compute(
    evidence: dict[str, Any], label_set: list[str], *, target_error: float, confidence: float,
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Thresholds from held-out evidence (never training labels), in the shape ModelVersion.risk_control keeps.
    ``provenance`` (which labels, how they were held out) is stored beside the bound."""
    # The label set the codes index, as stored with the evidence (the source's may have changed since).
    labels = np.asarray([str(x) for x in evidence.get("label_set", label_set)], dtype=object)
    codes = np.asarray(evidence["top_label"], dtype=np.int64)
    result = choose_thresholds(
        np.asarray(evidence["confidence"], dtype=float), np.asarray(evidence["correct"], dtype=bool),
        labels[codes].astype(str) if len(codes) else np.asarray([], dtype=str),
        label_set=[str(x) for x in labels], target_error=float(target_error), delta=1.0 - float(confidence),
    )
    out = result.to_json()
    out["evidence"] = {**out["evidence"], "source": TIME_SPLIT_SOURCE, **(provenance or {})}
    return out


def _labels_used(rows: list[selectors.TrainingRow], positions: Any) -> dict[str, Any]:
    """Which labels back the bound: count, label id range and a hash over (item, label) in time order."""
    digest = hashlib.sha256()
    used = [rows[int(i)] for i in positions]
    for row in used:
        digest.update(f"{row.item_id}\t{row.label}\n".encode())
    return {"count": len(used), "min_label_id": min((r.label_id for r in used), default=None),
            "max_label_id": max((r.label_id for r in used), default=None), "sha256": digest.hexdigest()}


def _risk_evidence(
    *, trained: TrainedModel, frame: Any, rows: list[selectors.TrainingRow], labels: list[str],
    label_set: list[str], spec: dict[str, Any], algorithm: str, seed: int, min_labels: int, alpha: float,
    conformal_method: str,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Held-out evidence for risk control and where it came from. Where labels are few (at most
    ``RISK_CONTROL_CROSSFIT_MAX_LABELS``), every label is scored out of fold (``crossfit_evidence``: K models,
    each trained without the block it scores); above that, or when a fold cannot be trained, the newest 20%
    that the shipped model never saw. Never the labels a scoring model trained on."""
    folds = int(conf.get("RISK_CONTROL_CROSSFIT_FOLDS"))
    limit = int(conf.get("RISK_CONTROL_CROSSFIT_MAX_LABELS"))
    skipped: str | None = None
    if folds < 2:
        skipped = "cross-fitting is off (RISK_CONTROL_CROSSFIT_FOLDS < 2)"
    elif len(labels) > limit:
        skipped = (f"{len(labels)} labels: above {limit} the newest 20% alone is enough evidence, and {folds} "
                   "extra fits would cost more than they add")
    else:
        try:
            evidence, record = crossfit_evidence(frame, labels, label_set, spec, folds=folds, algorithm=algorithm,
                                                 seed=seed, alpha=alpha, conformal_method=conformal_method,
                                                 min_labels=min_labels)
        except ValueError as exc:
            skipped = f"cross-fitting not possible: {exc}"
        else:
            return evidence, {
                "source": (f"all {len(labels)} labels, each scored out of fold: {folds} contiguous time blocks, "
                           "each scored by a model trained the same way on the other blocks"),
                "labels": _labels_used(rows, range(len(rows))),
                "crossfit": record,
                "assumption": ("the shipped model is trained by the same procedure on all the labels and is taken "
                               "to err no more often at any threshold than the fold models trained on "
                               f"{folds - 1}/{folds} of them; pooled out-of-fold errors are treated as "
                               "independent draws; labels and future items are exchangeable (no drift)"),
            }
    evidence = heldout_evidence(trained, labels, label_set)
    return evidence, {"source": TIME_SPLIT_SOURCE, "labels": _labels_used(rows, trained.test_index),
                      "crossfit_skipped": skipped,
                      "assumption": "held-out labels and future items are exchangeable (no drift)"}


def _similarity_index(
    rows: list[selectors.TrainingRow], spec: dict[str, Any], label_set: list[str]
) -> tuple[str, dict[str, Any]]:
    """Build and store the nearest-neighbour index over the newest decided items (their active labels)."""
    newest = rows[-int(conf.get("SIMILARITY_INDEX_MAX_ITEMS")):]
    frame = frame_from_payloads([r.payload for r in newest], spec)
    with limit_threads(1):
        index = build_index(frame, [r.label for r in newest], [r.item_id for r in newest], spec, label_set)
    return save_artifact(index), {"items": len(newest), "space": "cosine over standardised, one-hot and TF-IDF "
                                                                  "features"}


def model_train(
    *,
    source: Source,
    actor: Any | None,
    algorithm: str = "logreg",
    promote: bool | None = None,
    model_version: ModelVersion | None = None,
    seed: int = 0,
    trigger: str = "manual",
) -> ModelVersion:
    """Train a version from the source's active labels (time-ordered), store the artifacts (model, held-out
    evidence, similarity index), choose risk-control thresholds, and promote it when there is no champion, when
    ``promote`` is True, or (``promote`` None) when it beats the champion on the same held-out labels (see
    ``_promotion_decision``). A candidate that is not promoted automatically becomes a shadow.

    Returns the version: ``ready``, or ``failed`` with the reason when the labels cannot support a model.
    A version that is no longer ``training`` is returned untouched (the training task is idempotent).
    Training itself runs outside any transaction; only the bookkeeping is transactional.
    """
    if model_version is None:
        _validate_algorithm(algorithm)
        model_version = _version_create(source=source, actor=actor, algorithm=algorithm, trigger=trigger)
    elif model_version.status != ModelVersion.Status.TRAINING:
        return model_version
    algorithm = model_version.algorithm
    min_labels = int(getattr(settings, "TRAIN_MIN_LABELS", MIN_LABELS))
    alpha = float(conf.get("CONFORMAL_ALPHA"))
    conformal_method = str(conf.get("CONFORMAL_METHOD"))
    target_error = float(conf.get("RISK_CONTROL_DEFAULT_TARGET_ERROR"))
    confidence = float(conf.get("RISK_CONTROL_DEFAULT_CONFIDENCE"))
    try:
        schema = selectors.schema_current(source=source)
        if schema is None:
            raise ValueError("the source has no schema version")
        all_rows = selectors.training_rows(source=source)
        label_set = [str(x) for x in source.labels]
        rows = [r for r in all_rows if r.label in label_set]
        spec = feature_spec_from_schema(
            schema.json_schema, id_field=source.id_field, label_field=source.label_field,
            text_fields=list(source.text_fields or []),
        )
        frame = frame_from_payloads([r.payload for r in rows], spec)
        labels = [r.label for r in rows]
        trained = train(frame, labels, label_set, spec, algorithm=algorithm, seed=seed, min_labels=min_labels,
                        alpha=alpha, conformal_method=conformal_method)
        sha = save_model(trained)
        evidence, provenance = _risk_evidence(
            trained=trained, frame=frame, rows=rows, labels=labels, label_set=label_set, spec=spec,
            algorithm=algorithm, seed=seed, min_labels=min_labels, alpha=alpha, conformal_method=conformal_method)
        heldout_sha = save_arrays(evidence)
        risk = _risk_control_compute(evidence, label_set, target_error=target_error, confidence=confidence,
                                     provenance=provenance)
        try:
            similarity_sha, similarity = _similarity_index(rows, trained.spec, label_set)
        except ValueError as exc:  # e.g. nothing usable to index: similar decisions are optional, the model is not
            similarity_sha, similarity = "", {"error": str(exc)}
        champion = selectors.champion_for(source_id=source.pk)
        comparison = _compare_with_champion(champion=champion, candidate=trained, rows=rows, label_set=label_set)
    except TRANSIENT_DB_ERRORS:
        raise  # the task retries; the version stays ``training``
    except (ValueError, ArtifactError) as exc:
        return _version_fail(model_version_id=model_version.pk, actor=actor, reason=str(exc))
    except Exception as exc:
        # A bug or a resource limit: the version must still end up failed, and the error stays loud.
        _version_fail(model_version_id=model_version.pk, actor=actor, reason=f"{type(exc).__name__}: {exc}")
        raise

    promote_now, why = _promotion_decision(promote=promote, champion=champion, comparison=comparison)
    with transaction.atomic():
        Source.objects.select_for_update().filter(pk=source.pk).first()
        mv = ModelVersion.objects.select_for_update().get(pk=model_version.pk)
        if mv.status != ModelVersion.Status.TRAINING:
            return mv
        current = selectors.champion_for(source_id=source.pk)
        if promote_now and promote is not True and getattr(current, "pk", None) != getattr(champion, "pk", None):
            # Another version became champion while this one trained: the comparison is stale.
            promote_now, why = False, "the champion changed during training; not promoted automatically"
        shadow = (not promote_now and promote is None and current is not None
                  and bool(conf.get("SHADOW_CANDIDATES")))
        mv.status = ModelVersion.Status.READY
        mv.params = {
            **trained.params,
            "alpha": alpha,
            "conformal_method": conformal_method,
            "split": list(SPLIT),
            "min_labels": min_labels,
            "min_per_class": MIN_PER_CLASS,
            "calibration": trained.calibration,
        }
        mv.feature_spec = trained.spec
        mv.schema_version = schema
        mv.label_snapshot = _label_snapshot(rows, skipped=len(all_rows) - len(rows),
                                            fit_rows=trained.metrics["split"]["training"]
                                            + trained.metrics["split"]["calibration"])
        mv.metrics = {**trained.metrics, "similarity": similarity,
                      "promotion": {"promoted": promote_now, "reason": why, "comparison": comparison,
                                    "shadow": shadow}}
        mv.risk_control = risk
        mv.artifact_sha256 = sha
        mv.heldout_sha256 = heldout_sha
        mv.similarity_sha256 = similarity_sha
        mv.trained_at = timezone.now()
        mv.error = ""
        mv.save()
        audit_record(actor=actor, verb="model.trained", object_type="model_version", object_id=mv.pk,
                     after={**model_version_summary(mv), "label_snapshot": mv.label_snapshot, "promotion": why,
                            "risk_control": {"target_error": risk.get("target_error"),
                                             "thresholds": risk.get("thresholds"), "reason": risk.get("reason")}})
        if promote_now:
            _promote_locked(mv=mv, actor=actor, reason=why)
        elif shadow:
            _shadow_set_locked(mv=mv, actor=actor, enabled=True, reason="candidate not promoted automatically")
    return mv


def model_train_version(*, model_version_id: int) -> ModelVersion | None:
    """The training task's body: train into an existing ``training`` version; anything else is left alone."""
    mv = ModelVersion.objects.select_related("source", "created_by").filter(pk=model_version_id).first()
    if mv is None or mv.status != ModelVersion.Status.TRAINING:
        return mv
    # Tells the reconciler a worker has the job (the final params replace this on success).
    ModelVersion.objects.filter(pk=mv.pk, status=ModelVersion.Status.TRAINING).update(
        params={**(mv.params or {}), STARTED_KEY: timezone.now().isoformat()}
    )
    return model_train(source=mv.source, actor=mv.created_by, algorithm=mv.algorithm, model_version=mv)


# --- Retraining -----------------------------------------------------------------------------------


def _retraining_due(source: Source) -> tuple[bool, str, str]:
    """(due, algorithm, why) for one source. The caller holds the source's row lock."""
    versions = ModelVersion.objects.filter(source=source)
    if versions.filter(status=ModelVersion.Status.TRAINING).exists():
        return False, "", "a version is training"
    champion = versions.filter(is_champion=True).first()
    newest = versions.order_by("-version").first()
    # Counting from the newest run's watermark (not the champion's) means a candidate that was trained and not
    # promoted, or a run that failed, is not retried on the same labels every tick: it waits for new ones.
    if newest is None:
        since = 0
    elif newest.label_watermark is not None:
        since = newest.label_watermark
    else:
        since = int((newest.label_snapshot or {}).get("max_label_id") or 0)
    new = selectors.labels_since(source=source, label_id=since)
    need = max(int(source.retrain_min_new_labels), int(getattr(settings, "TRAIN_MIN_LABELS", MIN_LABELS)))
    if new < need:
        return False, "", f"{new} new labels since label {since}; needs {need}"
    ready = versions.filter(status=ModelVersion.Status.READY).order_by("-version").first()
    algorithm = (champion or ready).algorithm if (champion or ready) else str(conf.get("RETRAIN_DEFAULT_ALGORITHM"))
    kind = "first model" if champion is None else f"retraining (champion v{champion.version})"
    return True, algorithm, f"{kind}: {new} new labels since label {since} (threshold {need})"


def models_check_retraining() -> dict[str, Any]:
    """The periodic check (celery beat): start a training run for every source with enough new labels since its
    newest run (the champion's, or a later candidate's). Cold start is the same rule with no run yet. The run is
    evaluated and promoted (or not) by ``model_train``."""
    started: list[int] = []
    waiting: dict[str, str] = {}
    for source_id in Source.objects.order_by("pk").values_list("pk", flat=True):
        with transaction.atomic():
            source = Source.objects.select_for_update().filter(pk=source_id).first()
            if source is None:
                continue
            due, algorithm, why = _retraining_due(source)
            if not due:
                waiting[source.slug] = why
                continue
            mv = model_training_start(source=source, actor=None, algorithm=algorithm, trigger="retraining_check")
            audit_record(actor=None, verb="model.retraining_due", object_type="model_version", object_id=mv.pk,
                         after={"source": source.slug, "reason": why, "algorithm": algorithm})
            started.append(mv.pk)
    return {"started": started, "waiting": waiting}


# --- Promotion and shadows ------------------------------------------------------------------------


def _shadow_set_locked(*, mv: ModelVersion, actor: Any | None, enabled: bool, reason: str) -> None:
    """Turn shadow scoring on or off; at most SHADOW_MAX_PER_SOURCE shadows per source (the oldest stop).
    The caller holds the source row lock inside its transaction."""
    if mv.is_shadow == enabled:
        return
    stopped: list[int] = []
    if enabled:
        keep = max(int(conf.get("SHADOW_MAX_PER_SOURCE")) - 1, 0)
        others = list(ModelVersion.objects.select_for_update().filter(source_id=mv.source_id, is_shadow=True)
                      .exclude(pk=mv.pk).order_by("-version"))
        for old in others[keep:]:
            old.is_shadow = False
            old.save(update_fields=["is_shadow"])
            stopped.append(old.version)
    mv.is_shadow = enabled
    mv.save(update_fields=["is_shadow"])
    audit_record(actor=actor, verb="model.shadow_started" if enabled else "model.shadow_stopped",
                 object_type="model_version", object_id=mv.pk,
                 after={"version": mv.version, "reason": reason, "stopped_versions": stopped})


def model_shadow_set(*, model_version: ModelVersion, actor: Any | None, enabled: bool) -> ModelVersion:
    """Start or stop shadow scoring for a ready, non-champion version. 409 otherwise."""
    with transaction.atomic():
        Source.objects.select_for_update().filter(pk=model_version.source_id).first()
        mv = ModelVersion.objects.select_for_update().get(pk=model_version.pk)
        if enabled and (mv.status != ModelVersion.Status.READY or mv.is_champion):
            raise Conflict(f"Model version {mv.version} is {'the champion' if mv.is_champion else mv.status}; "
                           "only a ready candidate can run in shadow.")
        _shadow_set_locked(mv=mv, actor=actor, enabled=enabled, reason="by hand")
    return mv


def _promote_locked(*, mv: ModelVersion, actor: Any | None, reason: str) -> None:
    """Make ``mv`` the champion. The caller holds the source row lock inside its transaction."""
    old = ModelVersion.objects.select_for_update().filter(source_id=mv.source_id, is_champion=True).first()
    if old is not None and old.pk == mv.pk:
        return
    now = timezone.now()
    if old is not None:
        # The partial unique constraint allows one champion: clear the old one first.
        old.is_champion = False
        old.save(update_fields=["is_champion"])
    mv.is_champion = True
    mv.is_shadow = False
    mv.promoted_at = now
    mv.save(update_fields=["is_champion", "is_shadow", "promoted_at"])
    audit_record(
        actor=actor, verb="model.promoted", object_type="model_version", object_id=mv.pk,
        before={"champion_id": old.pk if old else None, "champion_version": old.version if old else None},
        after={"champion_id": mv.pk, "champion_version": mv.version, "reason": reason},
    )


def model_promote(*, model_version: ModelVersion, actor: Any | None) -> ModelVersion:
    """Make a ready version the champion (also the rollback: promote an earlier version). 409 if not ready."""
    with transaction.atomic():
        Source.objects.select_for_update().filter(pk=model_version.source_id).first()
        mv = ModelVersion.objects.select_for_update().get(pk=model_version.pk)
        if mv.status != ModelVersion.Status.READY:
            raise Conflict(f"Model version {mv.version} is {mv.status}; only a ready version can be promoted.")
        _promote_locked(mv=mv, actor=actor, reason="promoted by hand")
    return mv


# --- Risk control for other targets ----------------------------------------------------------------

_RISK_CACHE: OrderedDict[tuple[str, float, float], dict[str, Any]] = OrderedDict()
_RISK_CACHE_SIZE = 64
NO_EVIDENCE_REASON = ("this model version stored no held-out evidence (trained before risk control was recorded); "
                      "retrain it to auto-decide under a target error")


def model_risk_control(*, model_version: ModelVersion, target_error: float, confidence: float) -> dict[str, Any]:
    """Thresholds and evidence for (``target_error``, ``confidence``) from the version's stored held-out evidence,
    in the shape of ``ModelVersion.risk_control`` (``thresholds`` empty with a ``reason`` when the labels cannot
    support the promise). The stored default pair is returned as stored; other pairs are computed (milliseconds;
    no model is loaded, so web processes may call this) and cached per process."""
    if not 0 < float(target_error) < 1 or not 0 < float(confidence) < 1:
        raise ValidationFailed("target_error and confidence must be between 0 and 1.", [
            {"field": "target_error", "message": f"{target_error!r} must be in (0, 1)"},
            {"field": "confidence", "message": f"{confidence!r} must be in (0, 1)"},
        ])
    stored = model_version.risk_control or {}
    # A stored record without its confidence (written by hand or by an older version) counts as the same pair.
    if (stored.get("thresholds") is not None and stored.get("target_error") is not None
            and abs(float(stored["target_error"]) - float(target_error)) < 1e-12
            and (stored.get("confidence") is None or abs(float(stored["confidence"]) - float(confidence)) < 1e-9)):
        return stored
    if not model_version.heldout_sha256:
        return {"target_error": float(target_error), "confidence": float(confidence), "thresholds": {},
                "evidence": {}, "reason": NO_EVIDENCE_REASON}
    key = (model_version.heldout_sha256, round(float(target_error), 10), round(float(confidence), 10))
    cached = _RISK_CACHE.get(key)
    if cached is None:
        try:
            evidence = load_arrays(model_version.heldout_sha256)
        except ArtifactError as exc:
            return {"target_error": float(target_error), "confidence": float(confidence), "thresholds": {},
                    "evidence": {}, "reason": f"held-out evidence unavailable: {exc}"}
        stored_evidence = stored.get("evidence") or {}
        cached = _risk_control_compute(evidence, [str(x) for x in model_version.source.labels],
                                       target_error=float(target_error), confidence=float(confidence),
                                       provenance={k: stored_evidence[k] for k in PROVENANCE_KEYS
                                                   if k in stored_evidence})
        _RISK_CACHE[key] = cached
        while len(_RISK_CACHE) > _RISK_CACHE_SIZE:
            _RISK_CACHE.popitem(last=False)
    return cached


# --- Similar past decisions ------------------------------------------------------------------------

_INDEX_CACHE: OrderedDict[str, dict[str, Any]] = OrderedDict()
_INDEX_CACHE_SIZE = 4


def _cached_index(sha256: str) -> dict[str, Any]:
    index = _INDEX_CACHE.get(sha256)
    if index is None:
        index = load_artifact(sha256)
        if not isinstance(index, dict) or "nn" not in index:
            raise ArtifactError(f"artifact {sha256} is not a similarity index")
        _INDEX_CACHE[sha256] = index
        while len(_INDEX_CACHE) > _INDEX_CACHE_SIZE:
            _INDEX_CACHE.popitem(last=False)
    else:
        _INDEX_CACHE.move_to_end(sha256)
    return index


def similar_decisions(*, item: Item, k: int = 5) -> list[dict[str, Any]]:
    """The ``k`` already-decided items of ``item``'s source nearest to it, nearest first:
    ``[{"item_id", "external_id", "label", "distance"}, ...]`` (cosine distance in [0, 1]; label is the item's
    current active label when it has one, else the label it had when the index was built). Empty when the source
    has no index yet or the index cannot be read (logged): the review screen must not break over it."""
    mv = selectors.similarity_version_for(source_id=item.source_id)
    if mv is None or k <= 0:
        return []
    try:
        index = _cached_index(mv.similarity_sha256)
        frame = frame_from_payloads([item.payload if isinstance(item.payload, dict) else {}], index["spec"])
        with limit_threads(1):
            found = similarity_query(index, frame, k=min(int(k), 50), exclude=[item.pk])[0]
    except (ArtifactError, ValueError, KeyError) as exc:
        logger.warning("similar decisions unavailable for item %s: %s", item.pk, exc)
        return []
    ids = [f["item_id"] for f in found]
    external = dict(Item.objects.filter(pk__in=ids).values_list("pk", "external_id"))
    from reviewapp.review.models import Label

    current = dict(Label.objects.filter(item_id__in=ids, is_active=True).values_list("item_id", "label"))
    return [
        {"item_id": f["item_id"], "external_id": external.get(f["item_id"]),
         "label": current.get(f["item_id"], f["label"]), "distance": f["distance"]}
        for f in found if f["item_id"] in external
    ]


def models_reconcile() -> dict[str, int]:
    """Versions left ``training``: a message no worker ever started (broker outage, lost message) is sent
    again after RECONCILE_STUCK_SECONDS; a job past any task time limit (the worker died) becomes ``failed``
    with the reason, so nothing waits forever. Training again is one click."""
    now = timezone.now()
    stuck_after = timedelta(seconds=int(settings.RECONCILE_STUCK_SECONDS))
    give_up_after = timedelta(seconds=int(getattr(settings, "CELERY_TASK_TIME_LIMIT", 1800))) + stuck_after
    requeued = failed = 0
    for mv in ModelVersion.objects.filter(status=ModelVersion.Status.TRAINING, created_at__lt=now - stuck_after):
        started = (mv.params or {}).get(STARTED_KEY)
        since = datetime.fromisoformat(started) if started else mv.created_at
        if now - since > give_up_after:
            _version_fail(model_version_id=mv.pk, actor=None,
                          reason=f"training did not complete within {int(give_up_after.total_seconds())} seconds "
                                 "(worker lost or message lost)")
            failed += 1
        elif not started:
            # Duplicates are harmless: the first to finish wins and the other returns untouched.
            _send(TRAIN_TASK, {"model_version_id": mv.pk})
            requeued += 1
    return {"requeued": requeued, "failed": failed}


# --- Scoring --------------------------------------------------------------------------------------

class ScoringItem(NamedTuple):
    """What scoring reads of an item (attribute names as on ``Item``, so either can be passed)."""

    pk: int
    source_id: int
    payload: Any


_MODEL_CACHE: OrderedDict[tuple[int, str], TrainedModel] = OrderedDict()
_MODEL_CACHE_SIZE = 4
# The start-up warm-up (models_warm, in a thread) and the first task may want the same model: one loads it.
_MODEL_CACHE_LOCK = threading.Lock()


def _cached_model(mv: ModelVersion) -> TrainedModel:
    """Models stay loaded per worker process, keyed by version and artifact hash: a new champion is a new key."""
    key = (mv.pk, mv.artifact_sha256)
    with _MODEL_CACHE_LOCK:
        model = _MODEL_CACHE.get(key)
        if model is None:
            model = load_model(mv.artifact_sha256)
            _MODEL_CACHE[key] = model
            while len(_MODEL_CACHE) > _MODEL_CACHE_SIZE:
                _MODEL_CACHE.popitem(last=False)
        else:
            _MODEL_CACHE.move_to_end(key)
    return model


def models_warm() -> list[int]:
    """Load every source's champion into this process's cache (a worker calls it at start-up, in a thread).

    A fresh worker process otherwise pays its imports and each model's load (10-25 s on a busy 2-core machine,
    most of it skops) inside the first scoring task of a batch. Returns the model version ids loaded."""
    loaded = []
    for mv in ModelVersion.objects.filter(is_champion=True, status=ModelVersion.Status.READY).order_by("id")[
            :_MODEL_CACHE_SIZE]:
        try:
            _cached_model(mv)
        except ArtifactError as exc:  # the task will record it per item; warming just skips it
            logger.warning("warm-up: model version %s not loaded: %s", mv.pk, exc)
            continue
        loaded.append(mv.pk)
    return loaded


def model_cache_clear() -> None:
    _MODEL_CACHE.clear()


def _predict_items(
    model: TrainedModel, items: list[ScoringItem], label_set: list[str]
) -> tuple[dict[int, PredictionRow], dict[int, str]]:
    """Predictions (without explanations) for the whole chunk at once. If that raises, the chunk is split in
    halves and each half retried, down to single items: only the poison rows fail, at a cost of
    O(bad rows x log n) calls instead of one call per item."""
    try:
        frame = frame_from_payloads([i.payload for i in items], model.spec)
        rows = predict(model, frame, label_set, explain=False)
        return {i.pk: r for i, r in zip(items, rows, strict=True)}, {}
    except Exception as exc:  # any model or feature error: narrow it down, then record it per item
        if len(items) == 1:
            return {}, {items[0].pk: f"{type(exc).__name__}: {exc}"}
        logger.warning("scoring %d items failed (%s); splitting the chunk", len(items), exc)
    middle = len(items) // 2
    good, bad = _predict_items(model, items[:middle], label_set)
    more_good, more_bad = _predict_items(model, items[middle:], label_set)
    return {**good, **more_good}, {**bad, **more_bad}


def _explain_for_review(
    *, model_version: ModelVersion, model: TrainedModel, items: dict[int, ScoringItem], ids: list[int],
    predictions: dict[int, PredictionRow],
) -> int:
    """Explanations for the scored items a person will look at (those with an open review or QA task after
    routing; every item with SCORING_EXPLAIN="all"), written onto their predictions in the caller's transaction.
    Explaining costs several predictions' worth of work, and most items of a healthy source are auto-decided.
    An explainer that raises leaves explanations empty (logged): it never fails scoring."""
    wanted = _explain_wanted(ids=ids)
    if not wanted:
        return 0
    explanations = _explanations_for(model_version=model_version, model=model, items=items, wanted=wanted,
                                     predictions=predictions)
    if not explanations:
        return 0
    return _explanations_write(model_version=model_version, explanations=explanations)


def _explain_wanted(*, ids: list[int], new_tasks: set[int] | None = None) -> list[int]:
    """The items of ``ids`` to explain, ascending: every one with SCORING_EXPLAIN="all", none with "none", else
    those with an open task (already open, or in ``new_tasks``: routing's, not written yet)."""
    from reviewapp.review.models import ReviewTask

    mode = str(conf.get("SCORING_EXPLAIN"))
    if mode == "none":
        return []
    if mode == "all":
        return list(ids)
    open_now = set(ReviewTask.objects.filter(item_id__in=id_set(ids), state=ReviewTask.State.OPEN)
                   .values_list("item_id", flat=True))
    return sorted(open_now | (new_tasks or set()))


def _explanations_for(
    *, model_version: ModelVersion, model: TrainedModel, items: dict[int, ScoringItem], wanted: list[int],
    predictions: dict[int, PredictionRow],
) -> dict[int, Any]:
    """Item id -> explanation towards its new prediction's top label; empty when the family cannot explain or
    the explainer raises (logged: the predictions stand without it)."""
    if not wanted:
        return {}
    try:
        frame = frame_from_payloads([items[i].payload for i in wanted], model.spec)
        with limit_threads(1):
            explanations = explain_rows(model, frame, [predictions[i].top_label for i in wanted])
    except Exception as exc:  # an explainer bug must not lose the scores: the predictions stand without it
        logger.warning("explaining %d items with model version %s failed: %s", len(wanted), model_version.pk, exc)
        return {}
    if explanations is None:
        return {}
    return dict(zip(wanted, explanations, strict=True))


def _explanations_write(*, model_version: ModelVersion, explanations: dict[int, Any]) -> int:
    """Set the explanation of each item's prediction by ``model_version``. PostgreSQL: one COPY and one
    ``UPDATE ... FROM`` (``bulk_update``'s ``CASE WHEN`` per row was seconds per chunk); elsewhere the ORM."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            copy_stage(cursor, table="scoring_explanation_stage", columns=[("item_id", "bigint"), ("body", "text")],
                       rows=((i, json.dumps(e)) for i, e in explanations.items()))
            # ``= ANY``: probe the (item, model version) index for these items, not every prediction of the version.
            cursor.execute(
                "UPDATE scoring_prediction AS p SET explanation = s.body::jsonb FROM scoring_explanation_stage AS s"
                " WHERE p.item_id = s.item_id AND p.model_version_id = %s AND p.item_id = ANY(%s::bigint[])",
                [model_version.pk, id_array(explanations)],
            )
            return cursor.rowcount
    pks = dict(Prediction.objects.filter(item_id__in=list(explanations), model_version=model_version)
               .values_list("item_id", "pk"))
    rows = [Prediction(pk=pks[i], explanation=e) for i, e in explanations.items() if i in pks]
    Prediction.objects.bulk_update(rows, ["explanation"], batch_size=1000)
    return len(rows)


def _shadow_score(*, source_id: int, items: list[ScoringItem], label_set: list[str]) -> int:
    """Predictions by the source's shadow versions for items the champion just scored. They are stored like any
    prediction (one per item and version) but never routed: the item keeps pointing at the champion's. A shadow
    that cannot load or raises is logged and skipped; it never touches the live path."""
    if not items:
        return 0
    written = 0
    for mv in selectors.shadows_for(source_id=source_id):
        try:
            model = _cached_model(mv)
            frame = frame_from_payloads([i.payload for i in items], model.spec)
            rows = predict(model, frame, label_set, explain=False)
        except Exception as exc:  # see the docstring: a broken shadow is reported, not propagated
            logger.warning("shadow model version %s could not score %d items: %s", mv.pk, len(items), exc)
            continue
        now = timezone.now()
        Prediction.objects.bulk_create([
            Prediction(item_id=item.pk, model_version=mv, probabilities=row.probabilities, top_label=row.top_label,
                       confidence=row.confidence, alternatives=row.alternatives, prediction_set=row.prediction_set,
                       created_at=now)
            for item, row in zip(items, rows, strict=True)
        ], ignore_conflicts=True, batch_size=1000)
        written += len(rows)
    return written


def _items_record_failure(*, errors: dict[int, str], model_version: ModelVersion | None) -> dict[str, int]:
    """One more failed attempt per item; at MAX_TASK_ATTEMPTS the item is ``failed`` with the reason."""
    now = timezone.now()
    limit = int(settings.MAX_TASK_ATTEMPTS)
    with transaction.atomic():
        items = list(Item.objects.select_for_update().filter(pk__in=list(errors), state=Item.State.RECEIVED)
                     .order_by("id"))
        failed = 0
        for item in items:
            item.attempts += 1
            item.last_error = errors[item.pk][:2000]
            # Restart the deadline so the reconciler retries after a pause, not at once.
            item.state_changed_at = now
            if item.attempts >= limit:
                item.state = Item.State.FAILED
                item.last_error = f"scoring failed after {item.attempts} attempts: {errors[item.pk]}"[:2000]
                failed += 1
        Item.objects.bulk_update(items, ["attempts", "last_error", "state", "state_changed_at"], batch_size=1000)
        if items:
            audit_record(
                actor=None, verb="items.scoring_failed", object_type="model_version",
                object_id=model_version.pk if model_version else "",
                after={"attempt_failed": len(items), "failed": failed, "first_item_id": items[0].pk,
                       "last_item_id": items[-1].pk, "example_error": errors[items[0].pk][:300]},
            )
    return {"attempt_failed": len(items), "failed": failed}


class _PredictionJson:
    """A prediction's (probabilities, top label, confidence, alternatives, prediction set) for the staging COPY,
    the JSON texts exactly as ``json.dumps`` writes them (same separators, same float spelling, same escapes),
    built by joining pieces: ``json.dumps`` sets up an encoder per call, and three calls per row were the
    largest Python cost of writing a chunk. Anything but str labels and float/int values goes to ``json.dumps``.
    """

    def __init__(self) -> None:
        self.keys: dict[str, str] = {}  # label -> its JSON string, made once per chunk

    def key(self, label: Any) -> str:
        text = self.keys.get(label)
        if text is None:
            if type(label) is not str:
                raise TypeError(label)
            text = self.keys[label] = json.dumps(label)
        return text

    @staticmethod
    def number(value: Any) -> str:
        if type(value) is float:
            text = float.__repr__(value)
            if text[-1].isdigit():  # not nan or inf, which json spells NaN and Infinity
                return text
        elif type(value) is not int:
            raise TypeError(value)
        return json.dumps(value)

    def __call__(self, row: PredictionRow) -> tuple[str, str, float, str, str]:
        key, number = self.key, self.number
        try:
            probabilities = "{" + ", ".join([f"{key(k)}: {number(v)}" for k, v in row.probabilities.items()]) + "}"
            alternatives = "[" + ", ".join([f"[{key(k)}, {number(v)}]" for k, v in row.alternatives]) + "]"
            members = "[" + ", ".join([key(k) for k in row.prediction_set]) + "]"
        except (TypeError, ValueError):
            dumps = json.dumps
            probabilities, alternatives, members = (dumps(row.probabilities), dumps(row.alternatives),
                                                    dumps(row.prediction_set))
        return probabilities, row.top_label, row.confidence, alternatives, members


_PREDICTION_STAGE = [("item_id", "bigint"), ("probabilities", "text"), ("top_label", "text"), ("confidence", "float8"),
                     ("alternatives", "text"), ("prediction_set", "text"), ("explanation", "text")]


def _predictions_insert_pg(
    *, model_version: ModelVersion, ids: list[int], predictions: dict[int, PredictionRow],
    explanations: dict[int, Any], now: datetime,
) -> tuple[list[tuple[int, int, str, float]], set[int]]:
    """PostgreSQL: insert the predictions of locked ``ids`` with their explanations (``explanations``, item id ->
    explanation) in one COPY into a staging table and one ``INSERT ... SELECT ... ON CONFLICT DO NOTHING
    RETURNING``. One prediction per item and version: an item sent back to ``received`` keeps its earlier
    prediction by this version. Returns each item's stored prediction (item id, prediction id, top label,
    confidence; by item id) and the ids whose earlier prediction won (nothing was inserted for them)."""
    texts = _PredictionJson()
    dumps = json.dumps

    def explanation(pk: int, row: PredictionRow) -> str | None:
        body = explanations.get(pk, row.explanation)
        return None if body is None else dumps(body)

    rows = ((pk, *texts(r), explanation(pk, r)) for pk in ids for r in (predictions[pk],))
    with connection.cursor() as cursor:
        copy_stage(cursor, table="scoring_prediction_stage", columns=_PREDICTION_STAGE, rows=rows)
        cursor.execute(
            "INSERT INTO scoring_prediction (item_id, model_version_id, probabilities, top_label, confidence,"
            " alternatives, prediction_set, explanation, created_at)"
            " SELECT s.item_id, %s, s.probabilities::jsonb, s.top_label, s.confidence, s.alternatives::jsonb,"
            " s.prediction_set::jsonb, s.explanation::jsonb, %s FROM scoring_prediction_stage AS s"
            " ORDER BY s.item_id ON CONFLICT (item_id, model_version_id) DO NOTHING"
            " RETURNING item_id, id, top_label, confidence",
            [model_version.pk, now],
        )
        stored = cursor.fetchall()
        conflicted: set[int] = set()
        if len(stored) < len(ids):
            # The stored prediction, not the one just made: an earlier one by this version wins the conflict.
            inserted = {row[0] for row in stored}
            conflicted = {pk for pk in ids if pk not in inserted}
            cursor.execute(
                "SELECT item_id, id, top_label, confidence FROM scoring_prediction"
                " WHERE item_id = ANY(%s::bigint[]) AND model_version_id = %s",
                [id_array(sorted(conflicted)), model_version.pk],
            )
            stored += cursor.fetchall()
    stored.sort()
    return stored, conflicted


def _predictions_insert_orm(*, model_version: ModelVersion, ids: list[int], predictions: dict[int, PredictionRow],
                            now: datetime) -> None:
    """Other databases: the ORM's bulk path; the items point at their predictions (state ``scored``) and
    routing re-reads them."""
    Prediction.objects.bulk_create([
        Prediction(item_id=pk, model_version=model_version, probabilities=row.probabilities, top_label=row.top_label,
                   confidence=row.confidence, alternatives=row.alternatives, prediction_set=row.prediction_set,
                   explanation=row.explanation, created_at=now)
        for pk in ids for row in (predictions[pk],)
    ], ignore_conflicts=True, batch_size=1000)
    # One set-based UPDATE; the subquery uses the (item, model_version) unique index.
    Item.objects.filter(pk__in=ids).update(
        prediction_id=Subquery(
            Prediction.objects.filter(item_id=OuterRef("pk"), model_version=model_version).values("pk")[:1]
        ),
        state=Item.State.SCORED,
        state_changed_at=now,
    )


def _write_and_route_pg(
    *, model_version: ModelVersion, model: TrainedModel, items: dict[int, ScoringItem], ids: list[int],
    predictions: dict[int, PredictionRow], now: datetime,
) -> tuple[dict[str, Any], AuditEntry | None, int]:
    """PostgreSQL: each prediction row is written once, with its explanation, and each item once, with its
    prediction and route. Routing is planned from the new predictions first, which tells which items get an
    open task and so need an explanation; then the predictions are inserted with those explanations, and the
    plan is written pointing at them. (Writing explanations onto inserted rows afterwards was a second version
    of each queued item's prediction row.) An item that already had a prediction by this version keeps it and
    is routed by it: then the chunk is routed again from the stored predictions, as before, and those items'
    explanations are written onto their stored rows. Returns the routing counts, its audit entry and the
    number of items explained."""
    from reviewapp.review.services import items_route_rows_locked, route_rows_plan, route_rows_write

    mv_id = model_version.pk
    planned = route_rows_plan(
        rows=[(pk, items[pk].source_id, None, predictions[pk].top_label, predictions[pk].confidence, mv_id)
              for pk in ids],
        set_prediction=True,
    )
    assert planned is not None  # ids is not empty
    explanations = _explanations_for(
        model_version=model_version, model=model, items=items, predictions=predictions,
        wanted=_explain_wanted(ids=ids, new_tasks=planned.open_task_items()),
    )
    stored, conflicted = _predictions_insert_pg(model_version=model_version, ids=ids, predictions=predictions,
                                                explanations=explanations, now=now)
    if not conflicted:
        planned.with_predictions({pk: prediction_id for pk, prediction_id, _, _ in stored})
        routed, route_entry = route_rows_write(planned)
        return routed, route_entry, len(explanations)
    routed, route_entry = items_route_rows_locked(
        rows=[(pk, items[pk].source_id, prediction_id, top_label, confidence, mv_id)
              for pk, prediction_id, top_label, confidence in stored],
        skipped=len(ids) - len(stored), set_prediction=True,
    )
    explained = sum(1 for pk in explanations if pk not in conflicted)
    explained += _explain_for_review(model_version=model_version, model=model, items=items,
                                     ids=sorted(conflicted), predictions=predictions)
    return routed, route_entry, explained


def _items_lock_received(ids: list[int]) -> list[int]:
    """Lock the items of ``ids`` still ``received`` (caller's transaction), in id order; their ids."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT id FROM ingest_item WHERE id = ANY(%s::bigint[]) AND state = %s ORDER BY id"
                           " FOR UPDATE", [id_array(ids), Item.State.RECEIVED])
            return [row[0] for row in cursor.fetchall()]
    return list(Item.objects.select_for_update().filter(pk__in=id_set(ids), state=Item.State.RECEIVED)
                .order_by("id").values_list("pk", flat=True))


def _items_write_predictions(
    *, model_version: ModelVersion, model: TrainedModel, items: dict[int, ScoringItem],
    predictions: dict[int, PredictionRow],
) -> dict[str, Any]:
    from reviewapp.review.services import _items_route_locked

    now = timezone.now()
    with transaction.atomic():
        # Lock in id order (no deadlock with other chunks) and keep only items still waiting: idempotent.
        ids = _items_lock_received(list(predictions))
        if not ids:
            # Scored meanwhile by another worker (a late or redelivered message): nothing to do, same keys.
            return {"scored": 0, "routed": 0, "ids": [], "explained": 0}
        labels = Counter(predictions[pk].top_label for pk in ids)
        entries = [AuditEntry(
            "items.scored", "model_version", model_version.pk,
            after={"scored": len(ids), "source": model_version.source_id, "model_version": model_version.version,
                   "top_labels": dict(labels), "first_item_id": ids[0], "last_item_id": ids[-1]},
        )]
        if connection.vendor == "postgresql":
            routed, route_entry, explained = _write_and_route_pg(
                model_version=model_version, model=model, items=items, ids=ids, predictions=predictions, now=now)
        else:
            _predictions_insert_orm(model_version=model_version, ids=ids, predictions=predictions, now=now)
            routed, route_entry = _items_route_locked(item_ids=ids)
            explained = _explain_for_review(model_version=model_version, model=model, items=items, ids=ids,
                                            predictions=predictions)
        if route_entry is not None:
            entries.append(route_entry)
        # The audit trail serialises its writers until commit: write the events last, after the explaining.
        audit_record_many(actor=None, entries=entries)
    return {"scored": len(ids), "routed": routed, "ids": ids, "explained": explained}


def _items_read_received(ids: list[int]) -> list[ScoringItem]:
    """The items of ``ids`` still ``received``, by id, as plain tuples (building 2,000 Items cost ~10% of a
    worker's time). PostgreSQL: ``id = ANY(array)`` probes the primary key (see ``pgcopy.id_array``), and the
    payloads' JSON texts are parsed with one ``json.loads`` of their concatenation (same parser, same objects)
    instead of one call per row through Django's converters."""
    if connection.vendor != "postgresql":
        return [ScoringItem(*row) for row in Item.objects.filter(pk__in=id_set(ids), state=Item.State.RECEIVED)
                .values_list("id", "source_id", "payload")]
    with connection.cursor() as cursor:
        # jsonb comes back as text (Django registers a text loader; its JSONField parses it).
        cursor.execute("SELECT id, source_id, payload FROM ingest_item WHERE id = ANY(%s::bigint[]) AND state = %s"
                       " ORDER BY id", [id_array(ids), Item.State.RECEIVED])
        rows = cursor.fetchall()
    if not rows:
        return []
    payloads = json.loads("[" + ",".join(row[2] for row in rows) + "]")
    return [ScoringItem(pk, source_id, payload) for (pk, source_id, _), payload in zip(rows, payloads, strict=True)]


def items_score(*, item_ids: list[int]) -> dict[str, Any]:
    """Score items still ``received`` with their source's champion, then route them (same transaction), then
    let the source's shadow versions score the same items beside it.

    Items in any other state are ignored, so a repeated or duplicated message changes nothing. A source
    with no ready champion sends its items to review unscored.
    """
    from reviewapp.review.services import items_route_unscored

    ids = sorted({int(i) for i in item_ids})
    items = _items_read_received(ids)
    result: dict[str, Any] = {"requested": len(ids), "skipped": len(ids) - len(items), "scored": 0,
                              "unscored": 0, "attempt_failed": 0, "failed": 0, "explained": 0, "shadow_scored": 0}
    by_source: dict[int, list[Item]] = {}
    for item in items:
        by_source.setdefault(item.source_id, []).append(item)
    sources = {s.pk: s for s in Source.objects.filter(pk__in=list(by_source))}
    for source_id, group in by_source.items():
        champion = selectors.champion_for(source_id=source_id)
        if champion is None:
            result["unscored"] += items_route_unscored(item_ids=[i.pk for i in group], reason=NO_MODEL_REASON)
            continue
        label_set = [str(x) for x in sources[source_id].labels]
        try:
            model = _cached_model(champion)
        except ArtifactError as exc:
            outcome = _items_record_failure(errors={i.pk: f"model unavailable: {exc}" for i in group},
                                            model_version=champion)
            result["attempt_failed"] += outcome["attempt_failed"]
            result["failed"] += outcome["failed"]
            continue
        good, bad = _predict_items(model, group, label_set)
        if good:
            by_id = {i.pk: i for i in group}
            written = _items_write_predictions(model_version=champion, model=model, items=by_id, predictions=good)
            result["scored"] += written["scored"]
            result["explained"] += written["explained"]
            result["shadow_scored"] += _shadow_score(source_id=source_id, items=[by_id[i] for i in written["ids"]],
                                                     label_set=label_set)
        if bad:
            outcome = _items_record_failure(errors=bad, model_version=champion)
            result["attempt_failed"] += outcome["attempt_failed"]
            result["failed"] += outcome["failed"]
    return result


def _chunks(ids: list[int], size: int) -> list[list[int]]:
    return [ids[i:i + size] for i in range(0, len(ids), size)]


def items_reconcile(*, limit: int = 50_000) -> int:
    """Re-enqueue scoring for items stuck in ``received``; give up (``failed``, with the reason) after
    MAX_TASK_ATTEMPTS. The deadline doubles with each attempt, so a long but healthy backlog is not failed
    by impatience. Returns the number of items re-enqueued."""
    now = timezone.now()
    base = int(settings.RECONCILE_STUCK_SECONDS)
    max_attempts = int(settings.MAX_TASK_ATTEMPTS)
    with transaction.atomic():
        candidates = list(
            Item.objects.select_for_update(skip_locked=True)
            .filter(state=Item.State.RECEIVED, state_changed_at__lt=now - timedelta(seconds=base))
            .order_by("state_changed_at", "id")[:limit]
        )
        due = [i for i in candidates if now - i.state_changed_at >= timedelta(seconds=base * 2 ** min(i.attempts, 10))]
        if not due:
            return 0
        requeue: list[int] = []
        failed: list[int] = []
        for item in due:
            item.attempts += 1
            item.state_changed_at = now
            if item.attempts >= max_attempts:
                item.state = Item.State.FAILED
                item.last_error = (f"scoring did not complete after {item.attempts} attempts"
                                   + (f"; last error: {item.last_error}" if item.last_error else ""))[:2000]
                failed.append(item.pk)
            else:
                requeue.append(item.pk)
        Item.objects.bulk_update(due, ["attempts", "state", "state_changed_at", "last_error"], batch_size=1000)
        audit_record(
            actor=None, verb="items.scoring_reconciled", object_type="item", object_id="",
            after={"requeued": len(requeue), "failed": len(failed),
                   "first_item_id": due[0].pk, "last_item_id": due[-1].pk},
        )
        chunk_size = int(settings.SCORING_CHUNK_SIZE)
        for chunk in _chunks(sorted(requeue), chunk_size):
            transaction.on_commit(lambda chunk=chunk: _send(SCORE_TASK, {"item_ids": chunk}))
    return len(requeue)
