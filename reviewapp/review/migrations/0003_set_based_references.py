"""review_decision's references to its item, prediction, model version and policy: checked once per INSERT
statement by triggers (reviewapp.core.setrefs), not per row by PostgreSQL's foreign keys, which a scoring
chunk paid at COMMIT for every model decision (docs/benchmarks.md). The Django fields keep their on_delete
(db_constraint=False). verdict, decided_by and supersedes stay real foreign keys (NULL for model decisions).
Each column keeps its index, which the parent guards probe. Reverses to the real foreign keys."""

import django.db.models.deletion
from django.db import migrations, models

from reviewapp.core.setrefs import create_operation

REFERENCES = [("item_id", "ingest_item"), ("prediction_id", "scoring_prediction"),
              ("model_version_id", "scoring_modelversion"), ("policy_id", "review_policy")]


class Migration(migrations.Migration):
    dependencies = [
        ("ingest", "0005_item_set_based_references"),
        ("review", "0002_workspace"),
        ("scoring", "0004_set_based_references"),
    ]

    # Forwards: the foreign keys go, then the triggers come; backwards the other way round.
    operations = [
        migrations.AlterField(
            model_name="decision",
            name="item",
            field=models.ForeignKey(db_constraint=False, on_delete=django.db.models.deletion.PROTECT,
                                    related_name="decisions", to="ingest.item"),
        ),
        migrations.AlterField(
            model_name="decision",
            name="model_version",
            field=models.ForeignKey(blank=True, db_constraint=False, null=True,
                                    on_delete=django.db.models.deletion.PROTECT, to="scoring.modelversion"),
        ),
        migrations.AlterField(
            model_name="decision",
            name="policy",
            field=models.ForeignKey(blank=True, db_constraint=False, null=True,
                                    on_delete=django.db.models.deletion.PROTECT, to="review.policy"),
        ),
        migrations.AlterField(
            model_name="decision",
            name="prediction",
            field=models.ForeignKey(blank=True, db_constraint=False, null=True,
                                    on_delete=django.db.models.deletion.PROTECT, to="scoring.prediction"),
        ),
        create_operation("review_decision", REFERENCES),
    ]
