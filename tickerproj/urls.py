"""HTTP routes; WebSockets are routed in tickerproj/asgi.py."""

from django.contrib import admin
from django.urls import include, path

from tickerproj.api import api

urlpatterns = [
    path("admin/", admin.site.urls),
    path("accounts/", include("accounts.urls")),
    path("api/v1/", api.urls),
    path("api/", include("subscriptions.urls")),
    path("", include("streaming.urls")),
]
