"""JobLock moves beside the account leases; its table (subscriptions_joblock) stays as it is."""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ("streaming", "0001_initial"),
        ("subscriptions", "0003_candlegreeks_no_separate_instrument_index"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name="JobLock",
                    fields=[
                        ("name", models.CharField(max_length=100, primary_key=True, serialize=False)),
                        ("owner", models.CharField(max_length=200)),
                        ("expires_at", models.DateTimeField()),
                    ],
                    options={"db_table": "subscriptions_joblock"},
                ),
            ],
            database_operations=[],
        ),
    ]
