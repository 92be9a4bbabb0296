"""JobLock now belongs to ``streaming`` (beside the account leases); the table is kept."""

from django.db import migrations


class Migration(migrations.Migration):

    dependencies = [
        ("subscriptions", "0003_candlegreeks_no_separate_instrument_index"),
        ("streaming", "0002_joblock"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[migrations.DeleteModel(name="JobLock")],
            database_operations=[],
        ),
    ]
