from django.db import migrations, models


def existing_tokens_read(apps, schema_editor):
    # Tokens made before scopes existed streamed market data and read history: that is "read".
    apps.get_model("accounts", "ApiToken").objects.update(scopes=["read"])


class Migration(migrations.Migration):

    dependencies = [
        ("accounts", "0001_initial"),
    ]

    operations = [
        migrations.AddField(
            model_name="apitoken",
            name="scopes",
            field=models.JSONField(blank=True, default=list, help_text="What the token may do: read, subscribe, trade."),
        ),
        migrations.RunPython(existing_tokens_read, migrations.RunPython.noop),
    ]
