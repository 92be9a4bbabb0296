"""HTTP views of the streaming app: the service's health."""

from django.conf import settings
from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from streaming.health import HealthContext, health_report


@never_cache
@require_GET
def health(request: HttpRequest) -> JsonResponse:
    """200 with the engines' state when everything is live, 503 with the reasons otherwise."""
    ctx = HealthContext(
        redis_url=settings.REDIS_URL,
        heartbeat_max_age_s=settings.HEALTH_HEARTBEAT_MAX_AGE_S,
        stream_stall_s=settings.HEALTH_STREAM_STALL_S,
    )
    report = health_report(ctx)
    return JsonResponse(report, status=200 if report["status"] == "ok" else 503)
