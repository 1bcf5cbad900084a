"""Scoring benchmark: items/s per core for each model family at batch sizes 1, 100 and 10,000 including feature
building, single-item latency, training time for N labels, and worker RSS with each model loaded.

    python bench/scoring.py --labels 100000 --runs 5
    python bench/scoring.py --families logreg hgb --labels 20000 --runs 3     # a quicker look

No database: the scoring path measured is the one a worker runs per chunk (``frame_from_payloads`` from raw JSON
payloads, then ``predict``: features, calibrated probabilities, conformal sets, result rows), pinned to one thread
(workers run one process per core), so items/s is per core. Baseline, measured in the same run on the same rows:
a bare ``predict_proba`` of the same fitted scikit-learn estimator on features built beforehand (for torch
families, the bare network's forward pass on prebuilt features); the ratio says what features, calibration, sets
and result rows cost on top. Each figure is the median of --runs runs; single-item latency is over 300 items per
run, beside the bare ``predict_proba`` of each of those items alone (same run).
RSS: a child process imports what a worker imports, loads the model from its artifact and scores 10,000 items;
its peak RSS is reported beside a child that loads no model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, median, run_child

FAMILIES = ["logreg", "hgb", "torch_mlp", "torch_text"]
BATCHES = [1, 100, 10_000]

RSS_CHILD = r"""
import os, resource, sys, time
sys.path.insert(0, {root!r})
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "reviewapp.settings")
import django; django.setup()
import scoring.services, scoring.tasks  # what a worker imports
from reviewapp.demo import payments
sha = {sha!r}
if sha:
    from scoring.artifacts import load_model
    from scoring.features import frame_from_payloads
    from scoring.inference import predict
    model = load_model(sha)
    payloads = payments.generate_payments(10_000, seed=9, start=5_000_000).drop(columns=["is_fraud"]).to_dict("records")
    predict(model, frame_from_payloads(payloads, model.spec), list(payments.LABELS))
print("torch" in sys.modules)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _setup(artifact_root: str) -> None:
    os.environ["ARTIFACT_ROOT"] = artifact_root
    os.environ.setdefault("REVIEWAPP_ENV", "test")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "reviewapp.settings")
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()


def _bare_baseline(model, X) -> float:  # type: ignore[no-untyped-def]
    """Seconds for the bare estimator on prebuilt features."""
    estimator = model.pipeline.named_steps["model"]  # for a network: its forward pass and a softmax
    started = time.perf_counter()
    estimator.predict_proba(X)
    return time.perf_counter() - started


def bench_family(algorithm: str, *, n_labels: int, runs: int, artifact_root: str) -> dict:
    from reviewapp.demo import payments
    from scoring.artifacts import save_model
    from scoring.features import feature_spec_from_schema, frame_from_payloads
    from scoring.inference import limit_threads, predict
    from scoring.training import train

    labels = list(payments.LABELS)
    spec = feature_spec_from_schema(payments.SCHEMA, id_field=payments.ID_FIELD, label_field=payments.LABEL_FIELD,
                                    text_fields=payments.TEXT_FIELDS)
    history = payments.generate_payments(n_labels, seed=1)
    frame = frame_from_payloads(history.drop(columns=[payments.LABEL_FIELD]).to_dict("records"), spec)
    started = time.perf_counter()
    model = train(frame, history[payments.LABEL_FIELD].tolist(), labels, spec, algorithm=algorithm, seed=0)
    train_seconds = time.perf_counter() - started
    sha = save_model(model)

    fresh = payments.generate_payments(10_000, seed=2, start=9_000_000).drop(columns=[payments.LABEL_FIELD])
    payloads = fresh.to_dict("records")
    out: dict = {"algorithm": algorithm, "train_seconds": round(train_seconds, 2), "n_labels": n_labels,
                 "roc_auc": round(model.metrics["roc_auc"], 4), "ece": round(model.metrics["ece"], 4)}
    with limit_threads(1):
        # Warm-up: first calls pay one-off costs (threadpool scan, lazy imports) no steady worker pays.
        predict(model, frame_from_payloads(payloads[:100], model.spec), labels)
        for batch in BATCHES:
            n_batches = max(1, min(len(payloads) // batch, 300 if batch == 1 else 50))
            rates, cpu_rates = [], []
            for _ in range(runs):
                started, started_cpu = time.perf_counter(), time.process_time()
                for b in range(n_batches):
                    part = payloads[b * batch:(b + 1) * batch]
                    predict(model, frame_from_payloads(part, model.spec), labels)
                rates.append(n_batches * batch / (time.perf_counter() - started))
                cpu_rates.append(n_batches * batch / (time.process_time() - started_cpu))
            out[f"items_per_s_batch_{batch}"] = round(median(rates))
            out[f"items_per_cpu_s_batch_{batch}"] = round(median(cpu_rates))
        # Single-item latency (features + prediction), p50 and p95 over 300 items per run, median over runs: wall
        # clock, and this process's CPU time (what a dedicated core would see; on a shared machine the wall clock
        # includes waiting for one). Beside it, the same run's bare predict_proba of each item alone on features
        # built beforehand: its p95 is mostly the machine's scheduling noise, so the ratio is what we add.
        single = payloads[:300]
        prebuilt = [model.transform(frame_from_payloads([p], model.spec)) for p in single]
        estimator = model.pipeline.named_steps["model"]
        p50s, p95s, cpu95s, bare50s, bare95s = [], [], [], [], []
        for _ in range(runs):
            latencies, cpu, bare = [], [], []
            for p in single:
                started, started_cpu = time.perf_counter(), time.process_time()
                predict(model, frame_from_payloads([p], model.spec), labels)
                latencies.append((time.perf_counter() - started) * 1000)
                cpu.append((time.process_time() - started_cpu) * 1000)
            for X1 in prebuilt:
                started = time.perf_counter()
                estimator.predict_proba(X1)
                bare.append((time.perf_counter() - started) * 1000)
            p50s.append(float(np.percentile(latencies, 50)))
            p95s.append(float(np.percentile(latencies, 95)))
            cpu95s.append(float(np.percentile(cpu, 95)))
            bare50s.append(float(np.percentile(bare, 50)))
            bare95s.append(float(np.percentile(bare, 95)))
        out["single_p50_ms"] = round(median(p50s), 2)
        out["single_p95_ms"] = round(median(p95s), 2)
        out["single_cpu_p95_ms"] = round(median(cpu95s), 2)
        out["single_baseline_p50_ms"] = round(median(bare50s), 3)
        out["single_baseline_p95_ms"] = round(median(bare95s), 3)
        out["single_p95_runs_ms"] = [round(v, 2) for v in p95s]
        # Baseline: the bare estimator on features built beforehand, same 10,000 rows.
        X = model.transform(frame_from_payloads(payloads, model.spec))
        out["baseline_items_per_s_batch_10000"] = round(median([len(payloads) / _bare_baseline(model, X)
                                                                for _ in range(runs)]))
        out["ratio_to_baseline"] = round(out["items_per_s_batch_10000"] / out["baseline_items_per_s_batch_10000"], 3)
        # Explanations for a whole batch (the worker only explains items routed to review).
        rates = []
        for _ in range(runs):
            started = time.perf_counter()
            predict(model, frame_from_payloads(payloads, model.spec), labels, explain=True)
            rates.append(len(payloads) / (time.perf_counter() - started))
        out["items_per_s_batch_10000_with_explanations"] = round(median(rates))
    output, rss_kib = run_child(RSS_CHILD.format(root=str(ROOT), sha=sha), env={"ARTIFACT_ROOT": artifact_root})
    out["worker_rss_mb"] = round(rss_kib / 1024)
    out["worker_imported_torch"] = output.strip() == "True"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", type=int, default=100_000, help="labels to train on (payments generator)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--families", nargs="*", default=FAMILIES, choices=FAMILIES)
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-artifacts-") as artifact_root:
        _setup(artifact_root)
        _, rss_kib = run_child(RSS_CHILD.format(root=str(ROOT), sha=""), env={"ARTIFACT_ROOT": artifact_root})
        results = [bench_family(name, n_labels=args.labels, runs=args.runs, artifact_root=artifact_root)
                   for name in args.families]
    if args.json:
        print(json.dumps({"worker_rss_mb_without_model": round(rss_kib / 1024)}))
        for row in results:
            print(json.dumps(row))
        return
    print(f"labels: {args.labels:,}; runs: {args.runs}; one thread per process; "
          f"worker RSS without a model: {round(rss_kib / 1024)} MB")
    head = ("family", "train s", "b=1 it/s", "b=100 it/s", "b=10k it/s", "b=10k it/cpu-s", "baseline it/s",
            "ratio", "p50 ms", "p95 ms", "p95 cpu ms", "bare 1-item p50/p95 ms", "b=10k +expl it/s", "RSS MB", "AUC",
            "ECE")
    print(" | ".join(head))
    for r in results:
        print(" | ".join(str(v) for v in (
            r["algorithm"], r["train_seconds"], r["items_per_s_batch_1"], r["items_per_s_batch_100"],
            r["items_per_s_batch_10000"], r["items_per_cpu_s_batch_10000"], r["baseline_items_per_s_batch_10000"],
            r["ratio_to_baseline"], r["single_p50_ms"], r["single_p95_ms"], r["single_cpu_p95_ms"],
            f"{r['single_baseline_p50_ms']}/{r['single_baseline_p95_ms']}",
            r["items_per_s_batch_10000_with_explanations"], r["worker_rss_mb"], r["roc_auc"], r["ece"])))


if __name__ == "__main__":
    main()
