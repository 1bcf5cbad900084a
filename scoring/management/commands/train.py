from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from reviewapp.core.errors import NotFound, ValidationFailed
from scoring import selectors
from scoring.estimators import algorithm_names
from scoring.models import ModelVersion
from scoring.services import model_train


class Command(BaseCommand):
    help = "Train a model version from a source's labels (inline, in this process) and print its metrics."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("source", help="the source's slug")
        parser.add_argument("--algorithm", default="logreg", choices=algorithm_names())
        parser.add_argument("--promote", action="store_true",
                            help="make it champion even if it is worse than the current champion")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            source = selectors.source_get(slug=options["source"])
        except NotFound as exc:
            raise CommandError(f"unknown source {options['source']!r}") from exc
        self.stdout.write(f"training {source.slug} with {options['algorithm']}...")
        try:
            mv = model_train(source=source, actor=None, algorithm=options["algorithm"],
                             promote=True if options["promote"] else None, trigger="command")
        except ValidationFailed as exc:
            raise CommandError(exc.detail) from exc
        if mv.status != ModelVersion.Status.READY:
            raise CommandError(f"could not train {source.slug} model v{mv.version}: {mv.error}")
        m = mv.metrics
        out = self.stdout
        out.write(f"{source.slug} model v{mv.version} ({mv.algorithm}) trained on {mv.label_snapshot['count']} labels; "
                  f"measured on the newest {m['n']}")
        out.write(f"  accuracy {m['accuracy']:.4f} (majority baseline {m['majority_baseline_accuracy']:.4f})")
        out.write(f"  macro F1 {m['macro_f1']:.4f}   log loss {m['log_loss']:.4f}   "
                  f"ECE {m['ece']:.4f} ({m['calibration_method']})"
                  + (f"   ROC-AUC {m['roc_auc']:.4f}" if m.get("roc_auc") is not None else ""))
        for label, row in m["per_label"].items():
            out.write(f"  {label:>16}: F1 {row['f1']:.4f}  precision {row['precision']:.4f}  "
                      f"recall {row['recall']:.4f}  support {row['support']}")
        conformal = m.get("conformal") or {}
        if conformal.get("coverage") is not None:
            out.write(f"  prediction sets ({conformal.get('method', 'lac').upper()}): coverage "
                      f"{conformal['coverage']:.3f} (target {conformal['target_coverage']:.2f}), "
                      f"mean size {conformal['mean_set_size']:.2f}")
        risk = mv.risk_control or {}
        if risk.get("thresholds"):
            pairs = ", ".join(f"{label} >= {thr:.4f}" for label, thr in risk["thresholds"].items())
            out.write(f"  risk control (error <= {risk['target_error']:g} with confidence {risk['confidence']:g}): "
                      f"{pairs}")
        elif risk:
            out.write(f"  risk control: nothing auto-decided under a target error: {risk.get('reason')}")
        promotion = m.get("promotion") or {}
        mv.refresh_from_db(fields=["is_champion"])
        status = "champion" if mv.is_champion else "not champion"
        out.write(self.style.SUCCESS(f"{source.slug} model v{mv.version} is {status}: {promotion.get('reason', '')}"))
