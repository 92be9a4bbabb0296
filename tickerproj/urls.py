"""HTTP routes; WebSockets are routed in tickerproj/asgi.py."""

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("accounts/", include("accounts.urls")),
    path("api/", include("subscriptions.urls")),
    path("", include("streaming.urls")),
]
