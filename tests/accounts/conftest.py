"""Fixtures for the accounts tests; the Celery worker is shared with the subscriptions jobs."""

from tests.subscriptions.conftest import celery_worker  # noqa: F401  (a fixture, used by name)
