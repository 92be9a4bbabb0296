"""tickerproj: Kite tick streaming, Greeks and live option chains on Django."""

from tickerproj.celery import app as celery_app

__all__ = ["celery_app"]
