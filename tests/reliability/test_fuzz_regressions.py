"""Inputs schemathesis found that answered 5xx; each stays here as a regression test."""

from __future__ import annotations

import numpy as np

from scoring.risk_control import choose_thresholds


def test_a_subnormal_target_error_supports_no_threshold_instead_of_raising() -> None:
    # POST /api/v1/sources/{slug}/policy/versions/ with mode=target_error, target_error=2.225073858507203e-309
    # answered 500: the label-free floor log(delta) / log1p(-target_error) was infinite and ceil() overflowed.
    rng = np.random.default_rng(5)
    confidences = rng.uniform(0.5, 1.0, 400)
    result = choose_thresholds(
        confidences,
        rng.uniform(size=400) < confidences,
        np.where(rng.uniform(size=400) < 0.5, "legit", "fraud"),
        label_set=["legit", "fraud"],
        target_error=2.225073858507203e-309,
        delta=0.05,
    )
    assert result.thresholds == {}
