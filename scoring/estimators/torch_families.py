"""PyTorch families: an MLP over the tabular features and a small text classifier (an embedding bag over
hashed tokens, joined with the tabular features). No Django imports.

torch is imported here only, and only on first use (``_torch()``), so importing this module (or listing
families) costs nothing; web processes never load it. Training runs on CPU with fixed seeds (torch and NumPy),
one intra-op thread per process (workers run one process per core). Calibration is temperature scaling on the
held-out calibration rows. Explanations are integrated gradients from an all-absent baseline (numeric features
at their training mean, no category, no tokens), a few Riemann steps over the whole batch at once.

Weights leave this module only as a ``state_dict`` written by ``torch.save`` and read back with
``torch.load(weights_only=True)``; the network's shape travels separately as plain numbers.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.feature_extraction import FeatureHasher
from sklearn.pipeline import Pipeline

from scoring.calibration import temperature_fit, temperature_proba
from scoring.features import (
    HASH_BITS,
    build_hashed_preprocessor,
    build_preprocessor,
    feature_group,
    hashed_text_width,
    spec_fields,
    tabular_feature_names,
)

_TORCH: Any = None
IG_STEPS = 16
PREDICT_CHUNK = 8192


def _torch() -> Any:
    global _TORCH
    if _TORCH is None:
        import torch

        torch.set_num_threads(1)
        _TORCH = torch
    return _TORCH


def _round(value: float) -> float:
    return round(float(value), 4)


def _build_net(config: dict[str, Any]) -> Any:
    """The network for a plain-number config (what ``restore`` rebuilds before loading the state_dict)."""
    torch = _torch()
    nn = torch.nn
    if config["kind"] == "mlp":
        layers: list[Any] = []
        width = int(config["n_inputs"])
        for hidden in config["hidden"]:
            layers += [nn.Linear(width, int(hidden)), nn.ReLU(), nn.Dropout(float(config["dropout"]))]
            width = int(hidden)
        layers.append(nn.Linear(width, int(config["n_classes"])))
        return nn.Sequential(*layers)
    if config["kind"] == "text":
        return _text_net_class()(config)
    raise ValueError(f"unknown network kind {config['kind']!r}")


_TEXT_NET: Any = None


def _text_net_class() -> Any:
    """Defined on first use because its base class is torch's nn.Module."""
    global _TEXT_NET
    if _TEXT_NET is None:
        torch = _torch()

        class TextNet(torch.nn.Module):
            def __init__(self, config: dict[str, Any]) -> None:
                super().__init__()
                nn = torch.nn
                self.bag = nn.EmbeddingBag(int(config["n_buckets"]), int(config["dim"]), mode="sum", sparse=True)
                # Small initial token vectors: N(0, 1) (the default) starts every message far from the origin
                # and the network overfits rare tokens before it learns common ones.
                nn.init.normal_(self.bag.weight, std=float(config.get("init_std", 0.1)))
                self.drop = nn.Dropout(float(config["dropout"]))
                width = int(config["dim"]) + int(config["n_tabular"])
                self.head = nn.Sequential(
                    nn.Linear(width, int(config["hidden"])), nn.ReLU(), nn.Dropout(float(config["dropout"])),
                    nn.Linear(int(config["hidden"]), int(config["n_classes"])),
                )

            def forward(self, indices: Any, offsets: Any, weights: Any, tabular: Any) -> Any:
                bag = self.drop(self.bag(indices, offsets, per_sample_weights=weights))
                return self.head(torch.cat([bag, tabular], dim=1))

        _TEXT_NET = TextNet
    return _TEXT_NET


class _Adam:
    """Adam (with L2 weight decay, as torch.optim.Adam applies it), written out because constructing any
    torch.optim optimiser imports torch._dynamo: 5 s and a few hundred MB per process for nothing here."""

    def __init__(self, params: Any, *, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        torch = _torch()
        self.params = [p for p in params if p.requires_grad]
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.lr, self.weight_decay, self.betas, self.eps, self.t = lr, weight_decay, betas, eps, 0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        torch = _torch()
        self.t += 1
        b1, b2 = self.betas
        step_size = self.lr / (1 - b1**self.t)
        v_scale = 1 - b2**self.t
        with torch.no_grad():
            for p, m, v in zip(self.params, self.m, self.v, strict=True):
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    # An embedding's gradient touches a few rows: update only those (lazy Adam), so a step costs
                    # the batch's tokens, not the whole table.
                    g = g.coalesce()
                    rows, values = g.indices()[0], g.values()
                    m_rows = m[rows].mul_(b1).add_(values, alpha=1 - b1)
                    v_rows = v[rows].mul_(b2).addcmul_(values, values, value=1 - b2)
                    m[rows], v[rows] = m_rows, v_rows
                    p[rows] -= step_size * m_rows / ((v_rows / v_scale).sqrt_() + self.eps)
                    continue
                if self.weight_decay:
                    g = g.add(p, alpha=self.weight_decay)
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                p.addcdiv_(m, (v / v_scale).sqrt_().add_(self.eps), value=-step_size)


class TorchNetClassifier(ClassifierMixin, BaseEstimator):
    """A scikit-learn style classifier around a torch network: fit, logits, predict_proba, classes_.

    ``kind="mlp"`` takes dense arrays; ``kind="text"`` takes the hashed preprocessor's sparse output, whose first
    ``n_text_columns`` columns are hashed token buckets (fed to the embedding bag with their weights) and the rest
    tabular features.
    """

    def __init__(
        self,
        kind: str = "mlp",
        hidden: tuple[int, ...] | int = (64, 32),
        dim: int = 32,
        n_text_columns: int = 0,
        epochs: int = 20,
        batch_size: int = 128,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        dropout: float = 0.1,
        seed: int = 0,
    ) -> None:
        self.kind = kind
        self.hidden = hidden
        self.dim = dim
        self.n_text_columns = n_text_columns
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.dropout = dropout
        self.seed = seed

    # --- inputs ---------------------------------------------------------------------------------------

    def _split(self, X: Any) -> tuple[sparse.csr_matrix | None, np.ndarray]:
        if self.kind == "mlp":
            dense = X.toarray() if sparse.issparse(X) else np.asarray(X)
            return None, dense.astype(np.float32, copy=False)
        X = sparse.csr_matrix(X)
        text = X[:, : self.n_text_columns].tocsr()
        text.sort_indices()
        return text, X[:, self.n_text_columns:].toarray().astype(np.float32, copy=False)

    def _inputs(self, text: sparse.csr_matrix | None, tabular: np.ndarray, rows: np.ndarray | slice) -> tuple:
        torch = _torch()
        tab = torch.from_numpy(np.ascontiguousarray(tabular[rows]))
        if self.kind == "mlp":
            return (tab,)
        assert text is not None
        part = text[rows]
        return (
            torch.from_numpy(part.indices.astype(np.int64)),
            torch.from_numpy(part.indptr[:-1].astype(np.int64)),
            torch.from_numpy(part.data.astype(np.float32)),
            tab,
        )

    def _config(self, n_tabular: int) -> dict[str, Any]:
        if self.kind == "mlp":
            hidden = [int(h) for h in (self.hidden if isinstance(self.hidden, tuple | list) else [self.hidden])]
            return {"kind": "mlp", "n_inputs": n_tabular, "hidden": hidden, "dropout": float(self.dropout),
                    "n_classes": len(self.classes_)}
        hidden = int(self.hidden[0] if isinstance(self.hidden, tuple | list) else self.hidden)
        return {"kind": "text", "n_buckets": int(self.n_text_columns), "dim": int(self.dim),
                "n_tabular": n_tabular, "hidden": hidden, "dropout": float(self.dropout),
                "n_classes": len(self.classes_)}

    # --- scikit-learn API -------------------------------------------------------------------------------

    def fit(self, X: Any, y: Any) -> TorchNetClassifier:
        torch = _torch()
        y = np.asarray(y)
        self.classes_, y_index = np.unique(y, return_inverse=True)
        text, tabular = self._split(X)
        torch.manual_seed(self.seed)
        self.config_ = self._config(tabular.shape[1])
        self.net_ = _build_net(self.config_)
        optimiser = _Adam(self.net_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        loss_fn = torch.nn.CrossEntropyLoss()
        target = torch.from_numpy(y_index.astype(np.int64))
        rng = np.random.RandomState(self.seed)
        n = len(y_index)
        self.net_.train()
        for _ in range(int(self.epochs)):
            order = rng.permutation(n)
            for start in range(0, n, int(self.batch_size)):
                rows = np.sort(order[start:start + int(self.batch_size)])
                optimiser.zero_grad()
                loss = loss_fn(self.net_(*self._inputs(text, tabular, rows)), target[rows])
                loss.backward()
                optimiser.step()
        self.net_.eval()
        return self

    def logits(self, X: Any) -> np.ndarray:
        torch = _torch()
        text, tabular = self._split(X)
        out = []
        with torch.inference_mode():
            for start in range(0, tabular.shape[0], PREDICT_CHUNK):
                rows = slice(start, start + PREDICT_CHUNK)
                out.append(self.net_(*self._inputs(text, tabular, rows)).numpy())
        if not out:
            return np.zeros((0, len(self.classes_)))
        return np.concatenate(out).astype(np.float64)

    def predict_proba(self, X: Any) -> np.ndarray:
        return temperature_proba(self.logits(X), 1.0)


class TemperatureScaled:
    """Calibrated probabilities softmax(logits / T) over a fitted TorchNetClassifier."""

    def __init__(self, base: TorchNetClassifier, temperature: float) -> None:
        self.base = base
        self.temperature = float(temperature)
        self.classes_ = base.classes_

    def predict_proba(self, X: Any) -> np.ndarray:
        return temperature_proba(self.base.logits(X), self.temperature)


# --- families ------------------------------------------------------------------------------------------


class _TorchFamily:
    name = ""
    title = ""
    kind = ""
    stores_weights = True

    def params(self, *, seed: int) -> dict[str, Any]:
        raise NotImplementedError

    def _classifier(self, spec: dict[str, Any], *, seed: int) -> TorchNetClassifier:
        p = {k: v for k, v in self.params(seed=seed).items() if k not in ("hash_bits",)}
        return TorchNetClassifier(kind=self.kind, **p)

    def calibrate(self, fitted: TorchNetClassifier, X_cal: Any, y_cal: np.ndarray) -> tuple[Any, dict[str, Any]]:
        index = {c: j for j, c in enumerate(fitted.classes_)}
        y_index = np.array([index[v] for v in y_cal], dtype=int)
        temperature = temperature_fit(fitted.logits(X_cal), y_index)
        return TemperatureScaled(fitted, temperature), {"method": "temperature", "temperature": _round(temperature)}

    # --- artifacts ---------------------------------------------------------------------------------------

    def weights_bytes(self, model: Any) -> bytes:
        buffer = io.BytesIO()
        _torch().save(model.pipeline.named_steps["model"].net_.state_dict(), buffer)
        return buffer.getvalue()

    def network_info(self, model: Any) -> dict[str, Any]:
        clf: TorchNetClassifier = model.pipeline.named_steps["model"]
        return {
            "config": dict(clf.config_),
            "classes": [str(c) for c in clf.classes_],
            "temperature": float(model.calibrated.temperature),
            "estimator_params": {k: (list(v) if isinstance(v, tuple) else v) for k, v in clf.get_params().items()},
        }

    def restore(self, info: dict[str, Any], features: Any, weights: bytes) -> tuple[Pipeline, TemperatureScaled]:
        """Rebuild the pipeline and calibrated model from the bundle's plain numbers and a state_dict."""
        torch = _torch()
        state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
        params = dict(info["estimator_params"])
        if isinstance(params.get("hidden"), list):
            params["hidden"] = tuple(params["hidden"])
        clf = TorchNetClassifier(**params)
        clf.classes_ = np.array(info["classes"], dtype=object)
        clf.config_ = dict(info["config"])
        clf.net_ = _build_net(clf.config_)
        clf.net_.load_state_dict(state)
        clf.net_.eval()
        return Pipeline([("features", features), ("model", clf)]), TemperatureScaled(clf, info["temperature"])

    # --- explanations ------------------------------------------------------------------------------------

    def _log_odds(self, logits: Any, target: Any, temperature: float) -> Any:
        """log p_t - log(1 - p_t) of the calibrated softmax: the quantity explained (linear models explain the
        same one), so contributions read alike across families."""
        torch = _torch()
        z = logits / temperature
        picked = z.gather(1, target[:, None]).squeeze(1)
        others = z.clone()
        others.scatter_(1, target[:, None], float("-inf"))
        return picked - torch.logsumexp(others, dim=1)


class MLPFamily(_TorchFamily):
    name = "torch_mlp"
    title = "Multilayer perceptron on tabular features (PyTorch)"
    kind = "mlp"

    def params(self, *, seed: int) -> dict[str, Any]:
        # Chosen on the payments generator (a rare class, a few thousand labels): a higher rate overfits.
        return {"hidden": (64, 32), "epochs": 25, "batch_size": 64, "lr": 1e-3, "weight_decay": 1e-3,
                "dropout": 0.1, "seed": seed}

    def build(self, spec: dict[str, Any], *, seed: int) -> Pipeline:
        return Pipeline([("features", build_preprocessor(spec, dense=True)),
                         ("model", self._classifier(spec, seed=seed))])

    def explain(
        self, model: Any, frame: pd.DataFrame, X: Any, target: np.ndarray, *, top_k: int = 6, top_tokens: int = 5,
    ) -> list[dict[str, Any]]:
        torch = _torch()
        spec = model.spec
        clf: TorchNetClassifier = model.pipeline.named_steps["model"]
        names = list(model.pipeline.named_steps["features"].get_feature_names_out())
        _, dense = clf._split(X)
        n = dense.shape[0]
        if n == 0:
            return []
        x = torch.from_numpy(dense)
        t = torch.from_numpy(np.asarray(target, dtype=np.int64))
        temperature = float(model.calibrated.temperature)
        grads = torch.zeros_like(x)
        for step in range(IG_STEPS):
            alpha = (step + 0.5) / IG_STEPS
            point = (alpha * x).requires_grad_(True)
            self._log_odds(clf.net_(point), t, temperature).sum().backward()
            grads += point.grad
        with torch.no_grad():
            base = self._log_odds(clf.net_(torch.zeros_like(x)), t, temperature).numpy()
        attributions = (x * grads / IG_STEPS).numpy()
        return _summarise(spec, names, attributions, base, target, list(model.classes), top_k, top_tokens,
                          tokens=None)


class TextFamily(_TorchFamily):
    name = "torch_text"
    title = "Text classifier: embedding bag over hashed tokens (PyTorch)"
    kind = "text"

    def params(self, *, seed: int) -> dict[str, Any]:
        # Chosen on the SMS collection (spam F1 on unseen messages ~0.91); more epochs overfit rare tokens.
        return {"hash_bits": HASH_BITS, "dim": 32, "hidden": 32, "epochs": 5, "batch_size": 32, "lr": 5e-3,
                "weight_decay": 0.0, "dropout": 0.3, "seed": seed}

    def build(self, spec: dict[str, Any], *, seed: int) -> Pipeline:
        if not spec["text"]:
            raise ValueError("the text classifier needs a text field with words; this source has none "
                             "(use torch_mlp, logreg or hgb)")
        bits = int(self.params(seed=seed)["hash_bits"])
        clf = self._classifier(spec, seed=seed)
        clf.n_text_columns = hashed_text_width(spec, n_bits=bits)
        return Pipeline([("features", build_hashed_preprocessor(spec, n_bits=bits)), ("model", clf)])

    def explain(
        self, model: Any, frame: pd.DataFrame, X: Any, target: np.ndarray, *, top_k: int = 6, top_tokens: int = 5,
    ) -> list[dict[str, Any]]:
        torch = _torch()
        spec = model.spec
        features = model.pipeline.named_steps["features"]
        clf: TorchNetClassifier = model.pipeline.named_steps["model"]
        text, tabular = clf._split(X)
        assert text is not None
        n = tabular.shape[0]
        if n == 0:
            return []
        indices, offsets, weights, tab = clf._inputs(text, tabular, slice(0, n))
        t = torch.from_numpy(np.asarray(target, dtype=np.int64))
        temperature = float(model.calibrated.temperature)
        grad_w = torch.zeros_like(weights)
        grad_t = torch.zeros_like(tab)
        for step in range(IG_STEPS):
            alpha = (step + 0.5) / IG_STEPS
            w = (alpha * weights).requires_grad_(True)
            x = (alpha * tab).requires_grad_(True)
            self._log_odds(clf.net_(indices, offsets, w, x), t, temperature).sum().backward()
            grad_w += w.grad
            grad_t += x.grad
        with torch.no_grad():
            base = self._log_odds(clf.net_(indices, offsets, torch.zeros_like(weights), torch.zeros_like(tab)), t,
                                  temperature).numpy()
        token_attr = sparse.csr_matrix(((weights * grad_w / IG_STEPS).numpy(), text.indices, text.indptr),
                                       shape=text.shape)
        tab_attr = (tab * grad_t / IG_STEPS).numpy()
        # One block of buckets per text field, in spec order: fold each block into its field.
        width = 2 ** int(self.params(seed=0)["hash_bits"])
        field_cols = [f"text_{name}__" for name in spec["text"]]
        text_totals = np.zeros((n, len(spec["text"])))
        for j in range(len(spec["text"])):
            text_totals[:, j] = np.asarray(token_attr[:, j * width:(j + 1) * width].sum(axis=1)).ravel()
        names = field_cols + tabular_feature_names(features)
        attributions = np.hstack([text_totals, tab_attr])
        tokens = _hashed_tokens(features, spec, frame, token_attr, width, top_tokens)
        return _summarise(spec, names, attributions, base, target, list(model.classes), top_k, top_tokens,
                          tokens=tokens)


def _hashed_tokens(
    features: Any, spec: dict[str, Any], frame: pd.DataFrame, token_attr: sparse.csr_matrix, width: int, top: int,
) -> list[list[list[Any]]]:
    """Per row, its top tokens by |attribution| as ``["field:token", value]``, named by re-hashing the row's own
    tokens (a hashed bucket has no name of its own; when two tokens of one row share a bucket, the first names
    it)."""
    out: list[list[list[Any]]] = []
    analyzers = {name: features.named_transformers_[f"hash_{name}"].build_analyzer() for name in spec["text"]}
    hasher = FeatureHasher(n_features=width, input_type="string", alternate_sign=False)
    texts = {name: frame[name].tolist() for name in spec["text"]}
    for i in range(token_attr.shape[0]):
        start, end = token_attr.indptr[i], token_attr.indptr[i + 1]
        cols, vals = token_attr.indices[start:end], token_attr.data[start:end]
        order = np.argsort(-np.abs(vals), kind="stable")[:top]
        wanted = {int(cols[k]) for k in order}
        names: dict[int, list[str]] = {}
        for j, field in enumerate(spec["text"]):
            if not any(j * width <= c < (j + 1) * width for c in wanted):
                continue
            grams = list(dict.fromkeys(analyzers[field](texts[field][i] or "")))
            if not grams:
                continue
            buckets = hasher.transform([[g] for g in grams]).tocsr().indices
            for gram, bucket in zip(grams, buckets, strict=True):
                column = j * width + int(bucket)
                if column in wanted:
                    names.setdefault(column, []).append(f"{field}:{gram}")
        out.append([[names[int(cols[k])][0], _round(vals[k])] for k in order
                    if vals[k] != 0 and int(cols[k]) in names])
    return out


def _summarise(
    spec: dict[str, Any], names: list[str], attributions: np.ndarray, base: np.ndarray, target: np.ndarray,
    classes: list[str], top_k: int, top_tokens: int, *, tokens: list[list[list[Any]]] | None,
) -> list[dict[str, Any]]:
    """Fold column attributions into payload fields (and TF-IDF tokens when there are no hashed ones)."""
    fields = spec_fields(spec)
    field_index = {f: i for i, f in enumerate(fields)}
    groups = [feature_group(n, spec) for n in names]
    rows = [j for j, (f, _) in enumerate(groups) if f in field_index]
    G = sparse.csr_matrix((np.ones(len(rows)), (rows, [field_index[groups[j][0]] for j in rows])),
                          shape=(len(names), len(fields)))
    per_field = np.asarray(attributions @ G)
    token_cols = np.array([tok is not None and tok != "" for _, tok in groups])
    out = []
    for i in range(attributions.shape[0]):
        order = np.argsort(-np.abs(per_field[i]), kind="stable")[:top_k]
        entry: dict[str, Any] = {
            "method": "integrated_gradients",
            "steps": IG_STEPS,
            "target": str(classes[int(target[i])]),
            "base": _round(base[i]),
            "features": [[fields[j], _round(per_field[i, j])] for j in order if per_field[i, j] != 0],
        }
        if tokens is not None:
            entry["tokens"] = tokens[i]
        elif token_cols.any():
            cols = np.flatnonzero(token_cols & (attributions[i] != 0))
            best = cols[np.argsort(-np.abs(attributions[i, cols]), kind="stable")[:top_tokens]]
            entry["tokens"] = [[f"{groups[j][0]}:{groups[j][1]}", _round(attributions[i, j])] for j in best]
        out.append(entry)
    return out


MLP = MLPFamily()
TEXT = TextFamily()
