"""JobLock now belongs to ``streaming`` (beside the account leases); the table is kept."""

from django.db import migrations


class Migration(migrations.Migration):

    dependencies = [
        ("subscriptions", "0005_jobrun"),
        ("streaming", "0002_joblock"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[migrations.DeleteModel(name="JobLock")],
            database_operations=[],
        ),
    ]
