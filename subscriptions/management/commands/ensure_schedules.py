"""Create the default periodic-job schedules that are missing; never change existing ones."""

from django.core.management.base import BaseCommand

from subscriptions.schedules import DEFAULT_SCHEDULES, schedules_ensure_defaults


class Command(BaseCommand):
    help = __doc__

    def handle(self, *args, **options) -> None:
        created = schedules_ensure_defaults()
        for spec in DEFAULT_SCHEDULES:
            state = "created" if spec.name in created else "kept"
            self.stdout.write(f"{state}: {spec.name} ({spec.task})")
