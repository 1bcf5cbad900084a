"""Selective risk control (scoring/risk_control.py): pure, no database."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scoring.risk_control import choose_thresholds, clopper_pearson_upper, default_grid


def _synthetic(n: int, seed: int, labels: tuple[str, ...] = ("ham", "spam")) -> tuple[np.ndarray, ...]:
    """Calibrated confidences: the top label is right with probability equal to its confidence."""
    rng = np.random.default_rng(seed)
    conf = rng.uniform(1 / len(labels), 1.0, size=n)
    correct = rng.uniform(size=n) < conf
    tops = rng.choice(np.array(labels), size=n)
    return conf, correct, tops


def test_clopper_pearson_upper_known_values() -> None:
    # 0 errors in n: the bound is 1 - delta ** (1 / n) (the "rule of three" for delta = 0.05).
    assert clopper_pearson_upper(0, 100, 0.05) == pytest.approx(1 - 0.05 ** (1 / 100), rel=1e-9)
    assert clopper_pearson_upper(0, 0, 0.05) == 1.0
    assert clopper_pearson_upper(5, 5, 0.05) == 1.0
    assert clopper_pearson_upper(10, 100, 0.05) > 0.10


def test_default_grid_descending_and_bounded() -> None:
    g = default_grid(2)
    assert g[0] == 1.0 and g[-1] == pytest.approx(0.5)
    assert np.all(np.diff(g) < 0)


def test_thresholds_meet_the_promise_on_fresh_data() -> None:
    conf, correct, tops = _synthetic(6000, seed=1)
    res = choose_thresholds(conf, correct, tops, label_set=["ham", "spam"], target_error=0.05, delta=0.1)
    assert set(res.thresholds) == {"ham", "spam"}
    assert res.reason is None
    for label, thr in res.thresholds.items():
        ev = res.evidence["per_label"][label]
        assert ev["bound"] <= 0.05 and ev["n_auto"] >= 30 and ev["threshold"] == thr
        # True error of a calibrated model above t is (1 - t) / 2 on average: must be below the target.
        assert (1 - thr) / 2 <= 0.05 + 1e-9
    fresh_conf, fresh_correct, fresh_tops = _synthetic(20000, seed=2)
    auto = np.array([c >= res.thresholds[t] for c, t in zip(fresh_conf, fresh_tops, strict=True)])
    assert (~fresh_correct[auto]).mean() <= 0.05


def test_fixed_sequence_stops_at_first_failure() -> None:
    # Perfect items at the top, then a bad band, then perfect again: the scan must not jump over the bad band.
    conf = np.concatenate([np.full(100, 0.99), np.full(100, 0.9), np.full(2000, 0.8)])
    correct = np.concatenate([np.ones(100, bool), np.zeros(100, bool), np.ones(2000, bool)])
    tops = np.full(conf.size, "a")
    res = choose_thresholds(conf, correct, tops, label_set=["a"], target_error=0.05, delta=0.05,
                            grid=np.array([0.99, 0.9, 0.8]), start="first")
    ev = res.evidence["per_label"]["a"]
    assert res.thresholds == {"a": 0.99}
    assert ev["n_auto"] == 100 and ev["errors"] == 0 and ev["tested"] == 2
    assert ev["failed_at"]["threshold"] == 0.9
    # At 0.8 the pooled error is 100/2200 = 4.5%, which alone might pass; fixed-sequence never gets there.


def test_no_threshold_supported_gives_reason_and_no_auto() -> None:
    conf, correct, tops = _synthetic(500, seed=3)
    res = choose_thresholds(conf, correct, tops, label_set=["ham", "spam"], target_error=0.001, delta=0.05)
    assert res.thresholds == {}
    assert res.reason and "nothing is auto-decided" in res.reason
    assert res.evidence["per_label"]["ham"]["reason"]
    js = res.to_json()
    assert js["thresholds"] == {} and js["reason"] == res.reason


def test_too_few_labels() -> None:
    conf = np.full(10, 0.99)
    res = choose_thresholds(conf, np.ones(10, bool), np.full(10, "a"), label_set=["a", "b"],
                            target_error=0.05, delta=0.1)
    assert res.thresholds == {}
    assert "only 10 held-out labels; at least" in res.evidence["per_label"]["a"]["reason"]
    assert "0 held-out" in res.evidence["per_label"]["b"]["reason"]


def test_per_label_beats_shared_when_labels_differ() -> None:
    rng = np.random.default_rng(5)
    n = 20000
    tops = np.where(rng.uniform(size=n) < 0.5, "easy", "hard")
    conf = rng.uniform(0.5, 1.0, size=n)
    # "hard" is overconfident: its error is twice what its confidence says.
    err = np.where(tops == "easy", 1 - conf, np.minimum(1.0, 2 * (1 - conf)))
    correct = rng.uniform(size=n) >= err
    per = choose_thresholds(conf, correct, tops, label_set=["easy", "hard"], target_error=0.05, delta=0.1)
    shared = choose_thresholds(conf, correct, tops, label_set=["easy", "hard"], target_error=0.05, delta=0.1,
                               per_label=False)
    assert per.thresholds["hard"] > per.thresholds["easy"]
    assert len(set(shared.thresholds.values())) == 1
    assert shared.evidence["per_label_thresholds"] is False


def test_to_json_is_json_and_has_the_stored_shape() -> None:
    conf, correct, tops = _synthetic(3000, seed=7)
    res = choose_thresholds(conf, correct, tops, label_set=["ham", "spam"], target_error=0.05, delta=0.1)
    js = json.loads(json.dumps(res.to_json(), allow_nan=False))
    assert js["target_error"] == 0.05 and js["confidence"] == pytest.approx(0.9)
    assert set(js) >= {"target_error", "confidence", "thresholds", "evidence"}
    assert js["evidence"]["n_heldout"] == 3000


def test_validation() -> None:
    with pytest.raises(ValueError):
        choose_thresholds(np.ones(3), np.ones(2, bool), np.full(3, "a"), label_set=["a"], target_error=0.05,
                          delta=0.1)
    with pytest.raises(ValueError):
        choose_thresholds(np.ones(3), np.ones(3, bool), np.full(3, "a"), label_set=["a"], target_error=0.0,
                          delta=0.1)


def test_guarantee_holds_over_repeated_draws() -> None:
    """Across many held-out draws, the true error above the chosen threshold exceeds eps in <= delta of them."""
    eps, delta, trials = 0.05, 0.2, 60
    violations = 0
    for seed in range(trials):
        rng = np.random.default_rng(100 + seed)
        conf = rng.uniform(0.5, 1.0, size=800)
        correct = rng.uniform(size=800) < conf
        res = choose_thresholds(conf, correct, np.full(800, "a"), label_set=["a"], target_error=eps, delta=delta)
        thr = res.thresholds.get("a")
        # With conf ~ U(0.5, 1) and P(correct) = conf, the true error above thr is (1 - thr) / 2.
        violations += thr is not None and (1 - thr) / 2 > eps
    assert violations <= delta * trials
