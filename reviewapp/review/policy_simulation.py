"""The what-if simulator for routing policies.

Two layers:
* pure functions over arrays (``simulate``, ``tradeoff_curve``, ``histograms``, ``wilson_interval`` and the SVG
  geometry helpers), with no Django imports inside them, tested on synthetic data with known answers;
* a Django edge (``policy_simulate`` and the evidence selectors) that loads *honest* evidence: labels the champion
  never trained on, with the champion's predictions for them.

Honest evidence
---------------
The champion's label snapshot records the label id range it trained on. Two kinds of labels never touched its
weights: (1) the newest part of its own time-ordered split (``scoring.training.SPLIT``: the test part was held out
from fitting and calibration; it is reconstructed and checked against the snapshot's hash), and (2) labels
collected after it trained (id above the snapshot's ``max_label_id``). Labels from the QA sample of auto-decisions
are the only labels from inside the auto region of the policy in force; they are drawn at ``qa_sample_rate``, so
each counts ``1 / qa_sample_rate`` times in estimates (inverse-probability weighting), while reviewed and imported
labels count once. Intervals use the Kish effective sample size of those weights.

Shares (review, auto) need no labels: they come from the champion's predictions for recently received items, or,
when there are none, from the (weighted) evidence.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np

MIN_AUTO_LABELS = 30  # below this many labels in the auto region, an error estimate carries a warning
DEFAULT_Z = 1.959963984540054  # 95% two-sided
CURVE_GRID = tuple(np.round(np.concatenate([np.linspace(0.5, 0.95, 46), np.linspace(0.955, 0.995, 9),
                                            [0.9975, 0.999, 0.9995, 1.0]]), 6))
HIST_BINS = 20


# --- Pure layer -------------------------------------------------------------------------------------


@dataclass
class Evidence:
    """Held-out labeled items with the champion's predictions. All arrays have the same length."""

    confidences: np.ndarray
    top_labels: np.ndarray
    true_labels: np.ndarray
    weights: np.ndarray
    kinds: np.ndarray = field(default_factory=lambda: np.array([], dtype=str))  # "test_split" | "post_training"
    origins: np.ndarray = field(default_factory=lambda: np.array([], dtype=str))  # Label.origin

    @classmethod
    def build(cls, confidences: Any, top_labels: Any, true_labels: Any, weights: Any = None, kinds: Any = None,
              origins: Any = None) -> Evidence:
        conf = np.asarray(confidences, dtype=float).ravel()
        n = conf.size
        w = np.ones(n) if weights is None else np.asarray(weights, dtype=float).ravel()
        return cls(
            confidences=conf,
            top_labels=np.asarray(top_labels, dtype=str).ravel() if n else np.array([], dtype=str),
            true_labels=np.asarray(true_labels, dtype=str).ravel() if n else np.array([], dtype=str),
            weights=w,
            kinds=np.asarray(kinds if kinds is not None else [""] * n, dtype=str),
            origins=np.asarray(origins if origins is not None else [""] * n, dtype=str),
        )

    @property
    def size(self) -> int:
        return int(self.confidences.size)

    @property
    def correct(self) -> np.ndarray:
        return self.top_labels == self.true_labels


def wilson_interval(errors: float, n: float, *, z: float = DEFAULT_Z) -> tuple[float, float] | None:
    """Wilson score interval for a proportion; ``n`` may be an effective (weighted) sample size."""
    if n <= 0:
        return None
    p = min(max(errors / n, 0.0), 1.0)
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def auto_mask(confidences: np.ndarray, top_labels: np.ndarray, thresholds: dict[str, float] | None) -> np.ndarray:
    """Vectorised ``services.route_one``: auto when the top label has a threshold and confidence >= it."""
    conf = np.asarray(confidences, dtype=float)
    if thresholds is None or conf.size == 0:
        return np.zeros(conf.shape, dtype=bool)
    tops = np.asarray(top_labels, dtype=str)
    thr = np.full(conf.shape, np.inf)
    for label, value in thresholds.items():
        if value is not None:
            thr[tops == str(label)] = float(value)
    return conf >= thr


def _weighted_error(wrong: np.ndarray, w: np.ndarray, z: float) -> dict[str, Any]:
    n_labels = int(wrong.size)
    if n_labels == 0 or float(w.sum()) <= 0:
        return {"n_labels": n_labels, "errors": 0, "est_error": None, "interval": None, "n_effective": 0.0}
    total = float(w.sum())
    err = float((w * wrong).sum()) / total
    n_eff = total * total / float((w * w).sum())
    interval = wilson_interval(err * n_eff, n_eff, z=z)
    return {"n_labels": n_labels, "errors": int(wrong.sum()), "est_error": err,
            "interval": list(interval) if interval else None, "n_effective": round(n_eff, 2)}


def simulate(
    *,
    thresholds: dict[str, float] | None,
    label_set: list[str],
    evidence: Evidence,
    population_confidences: np.ndarray | None = None,
    population_top_labels: np.ndarray | None = None,
    qa_sample_rate: float = 0.0,
    z: float = DEFAULT_Z,
    min_auto_labels: int = MIN_AUTO_LABELS,
) -> dict[str, Any]:
    """Predicted shares and estimated auto-decision error of a policy's ``thresholds`` (None: nothing auto).

    Shares come from the population arrays when given (unweighted: every recent item counts once), else from the
    evidence with its weights. Errors come from the evidence only.
    """
    warnings: list[str] = []
    if population_confidences is not None and np.asarray(population_confidences).size:
        p_conf = np.asarray(population_confidences, dtype=float)
        p_top = np.asarray(population_top_labels, dtype=str)
        p_w = np.ones(p_conf.size)
        shares_from = "recent_predictions"
    else:
        p_conf, p_top, p_w = evidence.confidences, evidence.top_labels, evidence.weights
        shares_from = "evidence"
    p_auto = auto_mask(p_conf, p_top, thresholds)
    p_total = float(p_w.sum())
    auto_rate = float(p_w[p_auto].sum()) / p_total if p_total > 0 else 0.0
    review_rate = 1.0 - auto_rate if p_total > 0 else 1.0
    qa_rate = auto_rate * float(qa_sample_rate)

    e_auto = auto_mask(evidence.confidences, evidence.top_labels, thresholds)
    wrong = ~evidence.correct
    overall = _weighted_error(wrong[e_auto], evidence.weights[e_auto], z)

    per_label: dict[str, Any] = {}
    for label in label_set:
        thr = None if thresholds is None else thresholds.get(label)
        p_mask = p_top == label
        e_mask = e_auto & (evidence.top_labels == label)
        stats = _weighted_error(wrong[e_mask], evidence.weights[e_mask], z)
        per_label[label] = {
            "threshold": thr,
            "auto_rate": float(p_w[p_auto & p_mask].sum()) / p_total if p_total > 0 else 0.0,
            "predicted_rate": float(p_w[p_mask].sum()) / p_total if p_total > 0 else 0.0,
            "n_labels": stats["n_labels"],
            "errors": stats["errors"],
            "est_auto_error": stats["est_error"],
            "est_auto_error_interval": stats["interval"],
            "n_effective": stats["n_effective"],
        }
        if thr is not None and per_label[label]["auto_rate"] > 0 and stats["n_labels"] < min_auto_labels:
            warnings.append(f"{label}: the error estimate rests on {stats['n_labels']} held-out labels in the auto "
                            f"region (fewer than {min_auto_labels}); treat it as a rough guess")
    if auto_rate > 0 and overall["n_labels"] < min_auto_labels:
        warnings.insert(0, f"only {overall['n_labels']} held-out labels fall in the auto region (fewer than "
                           f"{min_auto_labels}): the estimated auto-error is not reliable")
    if p_total <= 0:
        warnings.append("no data to estimate shares from")
    return {
        "review_rate": review_rate,
        "auto_rate": auto_rate,
        "qa_review_rate": qa_rate,
        "est_auto_error": overall["est_error"],
        "est_auto_error_interval": overall["interval"],
        "n_labels": overall["n_labels"],
        "n_effective": overall["n_effective"],
        "n_evidence": evidence.size,
        "n_population": int(p_conf.size),
        "shares_from": shares_from,
        "per_label": per_label,
        "warnings": warnings,
    }


def tradeoff_curve(
    *, label_set: list[str], evidence: Evidence, population_confidences: np.ndarray | None = None,
    population_top_labels: np.ndarray | None = None, grid: tuple[float, ...] = CURVE_GRID,
) -> list[dict[str, Any]]:
    """Review share against estimated auto-error for one threshold shared by every label, over ``grid``."""
    points = []
    for t in grid:
        thresholds = {label: float(t) for label in label_set}
        sim = simulate(thresholds=thresholds, label_set=label_set, evidence=evidence,
                       population_confidences=population_confidences, population_top_labels=population_top_labels)
        points.append({"threshold": float(t), "review_rate": sim["review_rate"],
                       "est_auto_error": sim["est_auto_error"], "n_labels": sim["n_labels"]})
    return points


def histograms(*, label_set: list[str], evidence: Evidence, bins: int = HIST_BINS) -> dict[str, Any]:
    """Per true label: counts of the top-label confidence in ``bins`` bins over [lo, 1], split right / wrong."""
    lo = 1.0 / max(len(label_set), 1)
    edges = np.linspace(lo, 1.0, bins + 1)
    out: dict[str, Any] = {"edges": edges.tolist(), "per_label": {}}
    correct = evidence.correct
    for label in label_set:
        mask = evidence.true_labels == label
        conf = np.clip(evidence.confidences[mask], lo, 1.0)
        right, _ = np.histogram(conf[correct[mask]], bins=edges)
        wrong, _ = np.histogram(conf[~correct[mask]], bins=edges)
        out["per_label"][label] = {"right": right.tolist(), "wrong": wrong.tolist(), "n": int(mask.sum())}
    return out


# --- SVG geometry (pure; templates draw it) -----------------------------------------------------------

SVG_W, SVG_H = 360, 180
PAD_L, PAD_R, PAD_T, PAD_B = 40, 10, 12, 30


def _x(value: float, lo: float, hi: float) -> float:
    span = (hi - lo) or 1.0
    return round(PAD_L + (value - lo) / span * (SVG_W - PAD_L - PAD_R), 2)


def _y(value: float, hi: float) -> float:
    return round(SVG_H - PAD_B - (value / (hi or 1.0)) * (SVG_H - PAD_B - PAD_T), 2)


def histogram_svg(hist: dict[str, Any], thresholds: dict[str, float] | None) -> list[dict[str, Any]]:
    """One chart per true label: stacked bars (right, wrong) and a vertical line per label threshold."""
    edges = hist["edges"]
    lo, hi = edges[0], edges[-1]
    charts = []
    for label, data in hist["per_label"].items():
        top = max([r + w for r, w in zip(data["right"], data["wrong"], strict=True)] + [1])
        bars = []
        for i, (r, w) in enumerate(zip(data["right"], data["wrong"], strict=True)):
            x0, x1 = _x(edges[i], lo, hi), _x(edges[i + 1], lo, hi)
            y_r = _y(r, top)
            y_w = _y(r + w, top)
            bars.append({"x": x0 + 0.5, "w": max(x1 - x0 - 1, 0.5),
                         "right_y": y_r, "right_h": round(SVG_H - PAD_B - y_r, 2),
                         "wrong_y": y_w, "wrong_h": round(y_r - y_w, 2),
                         "title": f"{edges[i]:.3f}-{edges[i + 1]:.3f}: {r} right, {w} wrong"})
        lines = []
        for tl, tv in sorted((thresholds or {}).items()):
            if tv is not None and lo <= tv <= hi:
                lines.append({"x": _x(tv, lo, hi), "label": f"{tl} {tv:g}"})
        charts.append({
            "label": label, "n": data["n"], "bars": bars, "lines": lines, "max": top,
            "ticks": [{"x": _x(v, lo, hi), "text": f"{v:g}"} for v in np.round(np.linspace(lo, hi, 5), 3)],
            "base_y": SVG_H - PAD_B, "y_top": PAD_T, "x_left": PAD_L, "x_right": SVG_W - PAD_R,
        })
    return charts


def curve_svg(points: list[dict[str, Any]], marks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The review-share / auto-error curve. x: estimated auto-error, y: review share. ``marks`` are named
    points (current, candidate) with ``review_rate`` and ``est_auto_error``."""
    usable = [p for p in points if p["est_auto_error"] is not None]
    errs = [p["est_auto_error"] for p in usable] + [m["est_auto_error"] for m in marks.values()
                                                    if m.get("est_auto_error") is not None]
    x_hi = max([*errs, 0.01]) * 1.1
    plotted = [{"x": _x(p["est_auto_error"], 0.0, x_hi), "y": _y(p["review_rate"], 1.0),
                "threshold": p["threshold"],
                "title": (f"threshold {p['threshold']:g}: review {p['review_rate']:.1%}, "
                          f"auto-error {p['est_auto_error']:.2%} ({p['n_labels']} labels)")} for p in usable]
    path = " ".join(f"{'M' if i == 0 else 'L'}{p['x']},{p['y']}" for i, p in enumerate(plotted))
    mark_out = {}
    for name, m in marks.items():
        if m.get("est_auto_error") is None:
            mark_out[name] = None
            continue
        mark_out[name] = {"x": _x(m["est_auto_error"], 0.0, x_hi), "y": _y(m["review_rate"], 1.0),
                          "title": f"{name}: review {m['review_rate']:.1%}, auto-error {m['est_auto_error']:.2%}"}
    return {
        "points": plotted, "path": path, "marks": mark_out,
        "x_ticks": [{"x": _x(v, 0.0, x_hi), "text": f"{v:.1%}"} for v in np.linspace(0.0, x_hi, 5)],
        "y_ticks": [{"y": _y(v, 1.0), "text": f"{v:.0%}"} for v in (0.0, 0.25, 0.5, 0.75, 1.0)],
        "base_y": SVG_H - PAD_B, "y_top": PAD_T, "x_left": PAD_L, "x_right": SVG_W - PAD_R,
    }


# --- Django edge: evidence and the full simulation ---------------------------------------------------

# Families whose artifacts may be loaded in a web process (torch families must stay out of web processes).
WEB_SAFE_ALGORITHMS = frozenset({"logreg", "hgb"})
EVIDENCE_LIMIT = 20_000
POPULATION_DAYS = 30
POPULATION_LIMIT = 50_000
ARRIVAL_DAYS = 7
_EVIDENCE_CACHE: OrderedDict[tuple[Any, ...], EvidenceBundle] = OrderedDict()
_EVIDENCE_CACHE_SIZE = 8


@dataclass
class EvidenceBundle:
    evidence: Evidence
    counts: dict[str, int]
    warnings: list[str]
    champion_id: int | None
    max_label_id: int | None


def _snapshot_rows_match(rows: list[tuple[int, int, str]], snapshot: dict[str, Any]) -> bool:
    import hashlib

    digest = hashlib.sha256()
    for _label_id, item_id, label in rows:
        digest.update(f"{item_id}\t{label}\n".encode())
    return len(rows) == snapshot.get("count") and digest.hexdigest() == snapshot.get("sha256")


def _test_split_label_ids(source: Any, champion: Any) -> tuple[list[int], str | None]:
    """Label ids of the champion's held-out test part, reconstructed from its snapshot (or why not)."""
    from django.db.models import Q

    from reviewapp.review.models import Label
    from scoring.training import SPLIT

    snap = champion.label_snapshot or {}
    if not snap.get("count") or snap.get("max_label_id") is None or champion.trained_at is None:
        return [], "the champion records no label snapshot; its own held-out part cannot be used"
    label_set = [str(x) for x in source.labels]
    fit_until = snap.get("fit_until")
    if fit_until:
        # The snapshot names the last (created_at, id) its model or calibrator saw: later ones were held out.
        from datetime import datetime

        try:
            ts, last_id = datetime.fromisoformat(str(fit_until[0])), int(fit_until[1])
        except (TypeError, ValueError, IndexError):
            return [], "the champion's label snapshot has an unreadable fit boundary; its held-out part is not used"
        ids = Label.objects.filter(source=source, id__lte=snap["max_label_id"], is_active=True, label__in=label_set)
        ids = ids.filter(Q(created_at__gt=ts) | Q(created_at=ts, id__gt=last_id)).values_list("id", flat=True)
        return list(ids), None
    # Labels active when it trained, in the training order (created_at, id).
    rows = list(
        Label.objects.filter(source=source, id__lte=snap["max_label_id"], created_at__lte=champion.trained_at,
                             label__in=label_set)
        .filter(Q(withdrawn_at__isnull=True) | Q(withdrawn_at__gt=champion.trained_at))
        .order_by("created_at", "id").values_list("id", "item_id", "label")
    )
    if not _snapshot_rows_match(rows, snap):
        return [], "the champion's training labels changed since it trained; its held-out part is not used"
    n = len(rows)
    cut = int(n * SPLIT[0]) + int(n * SPLIT[1])
    return [r[0] for r in rows[cut:]], None


def _champion_predictions(champion: Any, items: list[tuple[int, dict[str, Any]]],
                          label_set: list[str]) -> tuple[dict[int, tuple[float, str]], str | None]:
    """Champion confidence and top label per item id: stored predictions first, then the artifact."""
    from scoring.models import Prediction

    out: dict[int, tuple[float, str]] = {}
    ids = [i for i, _ in items]
    for chunk_start in range(0, len(ids), 5000):
        chunk = ids[chunk_start:chunk_start + 5000]
        for item_id, conf, top in Prediction.objects.filter(model_version=champion, item_id__in=chunk).values_list(
                "item_id", "confidence", "top_label"):
            out[item_id] = (float(conf), str(top))
    missing = [(i, p) for i, p in items if i not in out]
    if not missing:
        return out, None
    if champion.algorithm not in WEB_SAFE_ALGORITHMS or not champion.artifact_sha256:
        return out, (f"{len(missing)} held-out labels have no stored prediction of the champion and its model "
                     f"cannot be loaded here; they are left out")
    from scoring.artifacts import ArtifactError, load_model
    from scoring.features import frame_from_payloads
    from scoring.inference import limit_threads, predict_proba_labels

    try:
        model = load_model(champion.artifact_sha256)
        frame = frame_from_payloads([p for _, p in missing], model.spec)
        with limit_threads(1):
            proba = predict_proba_labels(model, frame, label_set)
    except (ArtifactError, ValueError, KeyError, TypeError) as exc:
        return out, f"could not score held-out labels with the champion ({exc}); they are left out"
    top = proba.argmax(axis=1)
    for row, (item_id, _) in enumerate(missing):
        out[item_id] = (float(proba[row, top[row]]), label_set[int(top[row])])
    return out, None


def honest_evidence(*, source: Any, champion: Any | None) -> EvidenceBundle:
    """Labels the champion never trained on, with its predictions and inverse-probability weights."""
    from django.db.models import Count, Max

    from reviewapp.review.models import Label

    label_set = [str(x) for x in source.labels]
    empty = Evidence.build([], [], [])
    if champion is None:
        return EvidenceBundle(empty, {"test_split": 0, "post_training": 0, "qa": 0}, [
            "the source has no champion model: nothing can be auto-decided and there is nothing to simulate"],
            None, None)
    agg = Label.objects.filter(source=source).aggregate(m=Max("id"), n=Count("id"), w=Max("withdrawn_at"))
    key = (source.pk, champion.pk, champion.artifact_sha256, agg["m"], agg["n"], agg["w"], tuple(label_set))
    if key in _EVIDENCE_CACHE:
        _EVIDENCE_CACHE.move_to_end(key)
        return _EVIDENCE_CACHE[key]

    warnings: list[str] = []
    snap = champion.label_snapshot or {}
    max_label_id = snap.get("max_label_id")
    test_ids, why_not = _test_split_label_ids(source, champion)
    if why_not:
        warnings.append(why_not)
    if max_label_id is None:
        warnings.append("the champion records no training label range: every label is treated as held-out")
    post = Label.objects.filter(source=source, is_active=True, label__in=label_set)
    if max_label_id is not None:
        post = post.filter(id__gt=max_label_id)
    fields = ("id", "item_id", "label", "origin", "item__payload", "item__policy__qa_sample_rate")
    post_rows = list(post.order_by("-id").values_list(*fields)[:EVIDENCE_LIMIT])
    test_ids = sorted(test_ids)[-EVIDENCE_LIMIT:]
    test_rows = list(Label.objects.filter(id__in=test_ids).values_list(*fields)) if test_ids else []
    rows = [(r, "post_training") for r in post_rows] + [(r, "test_split") for r in test_rows]
    preds, why = _champion_predictions(champion, [(r[1], r[4]) for r, _ in rows], label_set)
    if why:
        warnings.append(why)
    conf, top, true, weights, kinds, origins = [], [], [], [], [], []
    for r, kind in rows:
        if r[1] not in preds:
            continue
        c, t = preds[r[1]]
        conf.append(c)
        top.append(t)
        true.append(r[2])
        # QA labels are the auto region's sample, drawn at the routing policy's QA rate.
        qa_rate = r[5] if r[3] == Label.Origin.QA and kind == "post_training" else None
        weights.append(1.0 / qa_rate if qa_rate else 1.0)
        kinds.append(kind)
        origins.append(r[3])
    evidence = Evidence.build(conf, top, true, weights, kinds, origins)
    counts = {
        "test_split": int((evidence.kinds == "test_split").sum()),
        "post_training": int((evidence.kinds == "post_training").sum()),
        "qa": int((evidence.origins == Label.Origin.QA).sum()),
    }
    bundle = EvidenceBundle(evidence, counts, warnings, champion.pk, max_label_id)
    _EVIDENCE_CACHE[key] = bundle
    while len(_EVIDENCE_CACHE) > _EVIDENCE_CACHE_SIZE:
        _EVIDENCE_CACHE.popitem(last=False)
    return bundle


def evidence_cache_clear() -> None:
    """Forget cached evidence and volumes (tests; a process otherwise refreshes them by key and by TTL)."""
    _EVIDENCE_CACHE.clear()
    _VOLUME_CACHE.clear()


def recent_population(*, source: Any, champion: Any | None) -> tuple[np.ndarray, np.ndarray]:
    """The champion's predictions for items received in the last POPULATION_DAYS (newest first, capped)."""
    from django.utils import timezone

    from scoring.models import Prediction

    if champion is None:
        return np.array([]), np.array([], dtype=str)
    since = timezone.now() - timedelta(days=POPULATION_DAYS)
    rows = list(
        Prediction.objects.filter(model_version=champion, item__source=source, item__received_at__gte=since)
        .order_by("-id").values_list("confidence", "top_label")[:POPULATION_LIMIT]
    )
    if not rows:
        return np.array([]), np.array([], dtype=str)
    return np.array([r[0] for r in rows], dtype=float), np.array([r[1] for r in rows], dtype=str)


def arrival_rate(*, source: Any, days: int = ARRIVAL_DAYS) -> float:
    """Items received per day over the last ``days`` days."""
    from django.utils import timezone

    from reviewapp.ingest.models import Item

    since = timezone.now() - timedelta(days=days)
    return Item.objects.filter(source=source, received_at__gte=since).count() / days


def median_handling_ms(*, source: Any) -> float | None:
    """Median verdict handling time for the source (the newest 5,000 verdicts that carry one)."""
    from reviewapp.review.models import Verdict

    values = list(
        Verdict.objects.filter(item__source=source, handling_ms__isnull=False, withdrawn_at__isnull=True)
        .order_by("-id").values_list("handling_ms", flat=True)[:5000]
    )
    return float(np.median(values)) if values else None


def thresholds_for_target(*, source: Any, champion: Any | None, target_error: float, confidence: float,
                           bundle: EvidenceBundle) -> dict[str, Any]:
    """The thresholds a target-error policy would use: the champion's stored risk control when it was made for
    the same (target_error, confidence), else computed now from the honest evidence."""
    from scoring.risk_control import choose_thresholds

    if champion is None:
        return {"thresholds": None, "from": "none", "reason": "no champion model", "risk_control": None}
    stored = champion.risk_control or {}
    if risk_control_matches(stored, target_error=target_error, confidence=confidence):
        return {"thresholds": {str(k): float(v) for k, v in (stored.get("thresholds") or {}).items()},
                "from": "champion", "reason": stored.get("reason"), "risk_control": stored}
    ev = bundle.evidence
    result = choose_thresholds(ev.confidences, ev.correct, ev.top_labels, label_set=[str(x) for x in source.labels],
                               target_error=target_error, delta=1.0 - confidence)
    rc = result.to_json()
    rc["evidence"]["basis"] = {"champion_id": champion.pk, **bundle.counts,
                               "note": "labels the champion never trained on (unweighted)"}
    return {"thresholds": dict(result.thresholds), "from": "computed", "reason": result.reason, "risk_control": rc}


def risk_control_matches(stored: dict[str, Any], *, target_error: float, confidence: float) -> bool:
    try:
        return (bool(stored) and "thresholds" in stored
                and math.isclose(float(stored["target_error"]), float(target_error), abs_tol=1e-9)
                and math.isclose(float(stored["confidence"]), float(confidence), abs_tol=1e-9))
    except (KeyError, TypeError, ValueError):
        return False


def candidate_thresholds(*, source: Any, champion: Any | None, candidate: dict[str, Any],
                         bundle: EvidenceBundle) -> dict[str, Any]:
    """Resolve a candidate policy dict to its thresholds (threshold mode: as given; target mode: risk control)."""
    if candidate.get("mode") == "target_error":
        eps, conf = candidate.get("target_error"), candidate.get("confidence") or 0.95
        if eps is None or not 0 < float(eps) < 1 or not 0 < float(conf) < 1:
            return {"thresholds": None, "from": "none", "risk_control": None,
                    "reason": "target error and confidence must be between 0 and 1 (exclusive)"}
        return thresholds_for_target(source=source, champion=champion, target_error=float(candidate["target_error"]),
                                      confidence=float(candidate.get("confidence") or 0.95), bundle=bundle)
    thresholds = {str(k): float(v) for k, v in (candidate.get("thresholds") or {}).items() if v is not None}
    return {"thresholds": thresholds, "from": "policy", "reason": None, "risk_control": None}


_VOLUME_CACHE: OrderedDict[tuple[Any, ...], tuple[float, Any]] = OrderedDict()
VOLUME_TTL_SECONDS = 60.0


def _volume(source: Any, champion: Any | None) -> tuple[np.ndarray, np.ndarray, float, float | None]:
    """Recent predictions, arrival rate and median handling time, cached for a minute per process: the what-if
    recomputes on every slider move and these do not change at that pace."""
    import time

    key = (source.pk, getattr(champion, "pk", None))
    now = time.monotonic()
    hit = _VOLUME_CACHE.get(key)
    if hit is not None and now - hit[0] < VOLUME_TTL_SECONDS:
        return hit[1]
    pop_conf, pop_top = recent_population(source=source, champion=champion)
    value = (pop_conf, pop_top, arrival_rate(source=source), median_handling_ms(source=source))
    _VOLUME_CACHE[key] = (now, value)
    while len(_VOLUME_CACHE) > _EVIDENCE_CACHE_SIZE:
        _VOLUME_CACHE.popitem(last=False)
    return value


def policy_simulate(*, source: Any, candidate: dict[str, Any], current: dict[str, Any] | None = None,
                    with_charts: bool = False) -> dict[str, Any]:
    """Everything the what-if view and the simulate API show for ``candidate`` (a policy as a dict)."""
    from scoring.selectors import champion_for

    champion = champion_for(source_id=source.pk)
    label_set = [str(x) for x in source.labels]
    bundle = honest_evidence(source=source, champion=champion)
    pop_conf, pop_top, per_day, handling = _volume(source, champion)
    resolved = candidate_thresholds(source=source, champion=champion, candidate=candidate, bundle=bundle)
    thresholds = resolved["thresholds"] if champion is not None else None
    qa = float(candidate.get("qa_sample_rate") or 0.0)
    sim = simulate(thresholds=thresholds, label_set=label_set, evidence=bundle.evidence,
                   population_confidences=pop_conf, population_top_labels=pop_top, qa_sample_rate=qa)
    reviews_per_day = per_day * (sim["review_rate"] + sim["qa_review_rate"])
    warnings = list(bundle.warnings) + sim["warnings"]
    if resolved.get("reason"):
        warnings.append(resolved["reason"])
    if handling is None:
        warnings.append("no verdict carries a handling time yet: analyst hours cannot be estimated")
    out: dict[str, Any] = {
        **{k: sim[k] for k in ("review_rate", "auto_rate", "qa_review_rate", "est_auto_error",
                               "est_auto_error_interval", "n_labels", "n_effective", "per_label", "shares_from",
                               "n_population")},
        "mode": candidate.get("mode", "threshold"),
        "thresholds": thresholds,
        "thresholds_from": resolved["from"],
        "target_error": candidate.get("target_error"),
        "confidence": candidate.get("confidence"),
        "qa_sample_rate": qa,
        "n_labels_used": bundle.evidence.size,
        "evidence": {**bundle.counts, "total": bundle.evidence.size, "max_training_label_id": bundle.max_label_id},
        "champion": None if champion is None else {"id": champion.pk, "version": champion.version},
        "arrivals_per_day": per_day,
        "reviews_per_day": reviews_per_day,
        "median_handling_ms": handling,
        "analyst_hours_per_day": None if handling is None else reviews_per_day * handling / 3_600_000,
        "risk_control": resolved.get("risk_control"),
        "warnings": warnings,
    }
    if with_charts:
        marks = {"candidate": {"review_rate": sim["review_rate"], "est_auto_error": sim["est_auto_error"]}}
        if current is not None:
            cur = candidate_thresholds(source=source, champion=champion, candidate=current, bundle=bundle)
            cur_sim = simulate(thresholds=cur["thresholds"] if champion is not None else None, label_set=label_set,
                               evidence=bundle.evidence, population_confidences=pop_conf,
                               population_top_labels=pop_top)
            marks["current"] = {"review_rate": cur_sim["review_rate"], "est_auto_error": cur_sim["est_auto_error"]}
            out["current"] = {"review_rate": cur_sim["review_rate"], "auto_rate": cur_sim["auto_rate"],
                              "est_auto_error": cur_sim["est_auto_error"], "thresholds": cur["thresholds"]}
        points = tradeoff_curve(label_set=label_set, evidence=bundle.evidence, population_confidences=pop_conf,
                                population_top_labels=pop_top)
        out["charts"] = {
            "histograms": histogram_svg(histograms(label_set=label_set, evidence=bundle.evidence), thresholds),
            "curve": curve_svg(points, marks),
            "svg_w": SVG_W, "svg_h": SVG_H,
        }
    return out
