"""JobLock now belongs to ``streaming`` (beside the account leases); the table is kept."""

from django.db import migrations


class Migration(migrations.Migration):

    dependencies = [
        ("subscriptions", "0004_bounded_rule_and_history_sizes"),
        ("streaming", "0002_joblock"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[migrations.DeleteModel(name="JobLock")],
            database_operations=[],
        ),
    ]
