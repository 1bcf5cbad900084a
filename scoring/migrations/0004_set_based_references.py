"""scoring_prediction's references to its item and model version: checked once per INSERT statement by
triggers (reviewapp.core.setrefs), not per row by PostgreSQL's foreign keys, which a scoring chunk paid at
COMMIT for every prediction (docs/benchmarks.md). The Django fields keep their on_delete (db_constraint=False).
Parent guards probe prediction_unique_item_model (leads with item_id) and the model_version_id index.
Reverses to the real foreign keys (PostgreSQL validates every existing row when it adds them)."""

import django.db.models.deletion
from django.db import migrations, models

from reviewapp.core.setrefs import create_operation

REFERENCES = [("item_id", "ingest_item"), ("model_version_id", "scoring_modelversion")]


class Migration(migrations.Migration):
    dependencies = [
        ("ingest", "0005_item_set_based_references"),
        ("scoring", "0003_prediction_item_index"),
    ]

    # Forwards: the foreign keys go, then the triggers come; backwards the other way round.
    operations = [
        migrations.AlterField(
            model_name="prediction",
            name="item",
            field=models.ForeignKey(db_constraint=False, db_index=False, on_delete=django.db.models.deletion.CASCADE,
                                    related_name="predictions", to="ingest.item"),
        ),
        migrations.AlterField(
            model_name="prediction",
            name="model_version",
            field=models.ForeignKey(db_constraint=False, on_delete=django.db.models.deletion.PROTECT,
                                    related_name="predictions", to="scoring.modelversion"),
        ),
        create_operation("scoring_prediction", REFERENCES),
    ]
