"""Drop scoring_prediction's index on item_id alone: the unique (item_id, model_version_id) leads with it, so
every lookup by item uses that one. Scoring writes one prediction per item; each index is one more entry per
row written (docs/benchmarks.md, ingest + score + route)."""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ("scoring", "0002_shadow_retraining_evidence"),
    ]

    operations = [
        migrations.AlterField(
            model_name="prediction",
            name="item",
            field=models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.CASCADE,
                                    related_name="predictions", to="ingest.item"),
        ),
    ]
