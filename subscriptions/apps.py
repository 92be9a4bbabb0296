from django.apps import AppConfig
from django.db.models.signals import post_migrate


def _ensure_schedules(sender, **kwargs) -> None:
    """After migrate: create the default periodic-job schedules that are missing."""
    from subscriptions.schedules import schedules_ensure_defaults  # models need ready apps

    schedules_ensure_defaults()


class SubscriptionsConfig(AppConfig):
    name = "subscriptions"
    verbose_name = "Instruments and subscriptions"

    def ready(self) -> None:
        # Once per migrate run (sender=self), after django_celery_beat's tables exist.
        post_migrate.connect(_ensure_schedules, sender=self, dispatch_uid="subscriptions.schedules")
