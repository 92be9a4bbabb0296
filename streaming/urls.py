"""HTTP routes of the streaming app."""

from django.urls import re_path

from streaming import views
from streaming.health import RedisProbe

app_name = "streaming"

# One per process: it holds the Redis probe's pooled connection.
_health = views.HealthViews(redis_probe=RedisProbe())

urlpatterns = [
    # Each with and without the trailing slash: load balancers probe without following redirects.
    re_path(r"^health/live/?$", _health.live, name="health-live"),
    re_path(r"^health/ready/?$", _health.ready, name="health-ready"),
    re_path(r"^health/?$", _health.report, name="health"),
]

# The live option-chain page (login required).
urlpatterns += [re_path(r"^$", views.chain_page, name="chain")]
