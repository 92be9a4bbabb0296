"""The pre-v1 HTTP path of the subscriptions app (mounted under /api/)."""

from django.urls import path

from subscriptions import views

app_name = "subscriptions"

urlpatterns = [
    path("history/<int:instrument_token>", views.history_redirect, name="history"),
]
