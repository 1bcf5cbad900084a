"""A realistic synthetic payments stream with ground truth, deterministic by seed.

Fraud (about 3%) depends on amount, merchant category, country mismatch, card presence, hour,
account age and velocity, with overlap between classes so a good model is confident on most
payments but not all; descriptions carry weak textual signal. No Django imports.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

LABELS = ["legit", "fraud"]
MERCHANT_CATEGORIES = ["grocery", "fuel", "restaurants", "travel", "electronics", "gift_cards", "crypto", "utilities"]
COUNTRIES = ["US", "GB", "DE", "FR", "NL", "BR", "NG", "IN"]
CURRENCIES = ["USD", "GBP", "EUR"]

SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {
        "payment_id": {"type": "string", "minLength": 1, "maxLength": 64},
        "amount": {"type": "number", "minimum": 0, "maximum": 1_000_000},
        "currency": {"type": "string", "enum": CURRENCIES},
        "merchant_category": {"type": "string", "enum": MERCHANT_CATEGORIES},
        "country": {"type": "string", "enum": COUNTRIES},
        "card_present": {"type": "boolean"},
        "hour": {"type": "integer", "minimum": 0, "maximum": 23},
        "account_age_days": {"type": "integer", "minimum": 0},
        "txn_count_24h": {"type": "integer", "minimum": 0},
        "description": {"type": "string", "maxLength": 2000},
        "is_fraud": {"type": "string", "enum": LABELS},
    },
    "required": ["payment_id", "amount", "currency", "merchant_category", "country", "card_present", "hour"],
}
ID_FIELD = "payment_id"
LABEL_FIELD = "is_fraud"
TEXT_FIELDS = ["description"]

_LEGIT_WORDS = ["weekly shop", "monthly bill", "coffee", "dinner", "fuel stop", "subscription", "groceries", "refill"]
_FRAUD_WORDS = ["urgent transfer", "gift card bulk", "verify account", "wallet top-up", "reship", "prize fee"]
_NEUTRAL_WORDS = ["online order", "payment", "purchase", "card payment", "checkout", "order"]


def generate_payments(n: int, *, seed: int = 7, start: int = 0, id_prefix: str = "pay") -> pd.DataFrame:
    """Return ``n`` payments with an ``is_fraud`` ground-truth column (``legit``/``fraud``)."""
    rng = np.random.default_rng(seed + start)
    category = rng.choice(MERCHANT_CATEGORIES, size=n, p=[0.27, 0.15, 0.2, 0.08, 0.1, 0.06, 0.04, 0.1])
    country = rng.choice(COUNTRIES, size=n, p=[0.4, 0.15, 0.12, 0.1, 0.08, 0.06, 0.04, 0.05])
    currency = np.where(np.isin(country, ["GB"]), "GBP", np.where(np.isin(country, ["DE", "FR", "NL"]), "EUR", "USD"))
    card_present = rng.random(n) < 0.55
    hour = rng.integers(0, 24, size=n)
    account_age = rng.gamma(2.0, 300.0, size=n).astype(int)
    velocity = rng.poisson(1.5, size=n)
    amount = np.round(rng.lognormal(3.4, 1.1, size=n), 2)

    risky_category = np.isin(category, ["gift_cards", "crypto", "electronics"]).astype(float)
    risky_country = np.isin(country, ["NG", "BR"]).astype(float)
    night = ((hour <= 4) | (hour >= 23)).astype(float)
    logit = (
        -4.7
        + 1.4 * risky_category
        + 1.0 * risky_country
        + 0.9 * night
        - 1.3 * card_present
        + 0.55 * np.log1p(amount) / 2
        + 0.35 * np.minimum(velocity, 8)
        - 0.9 * (account_age > 180)
        + rng.normal(0, 0.6, size=n)
    )
    fraud = rng.random(n) < 1.0 / (1.0 + np.exp(-logit))
    # Fraud skews larger.
    amount = np.where(fraud, np.round(amount * rng.uniform(1.5, 4.0, size=n), 2), amount)
    amount = np.minimum(amount, 999_999.0)

    def describe(is_fraud: bool, r: float) -> str:
        pool = _FRAUD_WORDS if (is_fraud and r < 0.6) or (not is_fraud and r < 0.03) else (
            _LEGIT_WORDS if r < 0.8 else _NEUTRAL_WORDS
        )
        return pool[int(r * 1000) % len(pool)]

    r = rng.random(n)
    description = [describe(bool(f), float(x)) for f, x in zip(fraud, r, strict=True)]
    ids = [f"{id_prefix}-{start + i:08d}" for i in range(n)]
    return pd.DataFrame(
        {
            "payment_id": ids,
            "amount": amount,
            "currency": currency,
            "merchant_category": category,
            "country": country,
            "card_present": card_present,
            "hour": hour.astype(int),
            "account_age_days": account_age.astype(int),
            "txn_count_24h": velocity.astype(int),
            "description": description,
            "is_fraud": np.where(fraud, "fraud", "legit"),
        }
    )
