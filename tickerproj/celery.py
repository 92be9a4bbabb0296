"""The Celery app; tasks live in each app's tasks.py, schedules in django-celery-beat."""

import os

from celery import Celery

from tickerproj.celery_observability import install as install_observability

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tickerproj.settings")

app = Celery("tickerproj")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
#: Logs through the project's structlog pipeline; task metrics (served by the worker).
task_metrics = install_observability(app)
