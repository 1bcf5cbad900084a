"""manage.py train SOURCE [--algorithm A] [--promote]."""

from __future__ import annotations

from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from reviewapp.demo import payments
from scoring.models import ModelVersion
from tests.factories import make_payments_source
from tests.scoring.helpers import add_labeled_history

pytestmark = pytest.mark.django_db


@pytest.fixture
def source(artifact_root: Path):
    src = make_payments_source()
    add_labeled_history(src, payments.generate_payments(1200, seed=8))
    return src


def test_train_prints_metrics_and_makes_the_first_champion(source) -> None:
    out = StringIO()
    call_command("train", "payments", stdout=out)
    text = out.getvalue()
    assert "payments model v1 (logreg) trained on 1200 labels" in text
    for word in ("accuracy", "macro F1", "log loss", "ECE", "ROC-AUC", "fraud: F1", "is champion",
                 "prediction sets (LAC)", "risk control"):
        assert word in text, word
    assert ModelVersion.objects.get().is_champion and ModelVersion.objects.get().trigger == "command"


def test_train_with_algorithm_and_promote(source) -> None:
    call_command("train", "payments", stdout=StringIO())
    out = StringIO()
    call_command("train", "payments", "--algorithm", "hgb", "--promote", stdout=out)
    assert "v2 is champion: promoted on request" in out.getvalue()
    assert ModelVersion.objects.get(is_champion=True).algorithm == "hgb"


def test_unknown_source_is_a_clear_error(source) -> None:
    with pytest.raises(CommandError, match="unknown source 'nope'"):
        call_command("train", "nope", stdout=StringIO())


def test_too_few_labels_is_a_clear_error(artifact_root: Path) -> None:
    src = make_payments_source(slug="small")
    add_labeled_history(src, payments.generate_payments(20, seed=1))
    with pytest.raises(CommandError, match="not enough labels to train: 20"):
        call_command("train", "small", stdout=StringIO())
    assert ModelVersion.objects.get().status == "failed"


def test_exit_status_is_non_zero(source, capsys: pytest.CaptureFixture) -> None:
    """Run the way a shell does: a CommandError becomes exit status 1 with the message on stderr."""
    from django.core.management import ManagementUtility

    with pytest.raises(SystemExit) as exited:
        ManagementUtility(["manage.py", "train", "nope"]).execute()
    assert exited.value.code == 1
    assert "unknown source 'nope'" in capsys.readouterr().err
