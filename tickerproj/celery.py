"""The Celery app; tasks live in each app's tasks.py, schedules in django-celery-beat."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tickerproj.settings")

app = Celery("tickerproj")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
