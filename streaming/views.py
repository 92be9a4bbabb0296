"""HTTP views of the streaming app: the service's health and the live option-chain page."""

import datetime as dt
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.core.cache import caches
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render, resolve_url
from django.utils import timezone
from django.utils.decorators import method_decorator
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from streaming.greeks import FAILURE_FLAGS, Flag
from streaming.health import (
    HealthContext,
    RedisProbe,
    health_report,
    health_report_public,
    liveness_report,
    readiness_report,
)
from streaming.routing import WS_PATH
from subscriptions.selectors import instrument_list_expiries, instrument_list_underlyings
from tickerproj.access import OpsAccess, carries_forwarding


class HealthViews:
    """``/health/live``, ``/health/ready`` and ``/health``: one instance per process.

    It owns the Redis probe (one pooled connection, not one per call). Reports are cached
    for HEALTH_CACHE_S so that a flood of public probes costs a few queries a second at most.
    Anyone gets statuses and reason codes; the details of ``/health`` (engine ids, account
    labels, error texts) need explicit ops access (tickerproj/access.py).
    """

    def __init__(self, *, redis_probe: RedisProbe, cache_alias: str = "default") -> None:
        self._redis_probe = redis_probe
        self._cache_alias = cache_alias

    def _context(self) -> HealthContext:
        return HealthContext(
            redis_url=settings.REDIS_URL,
            heartbeat_max_age_s=settings.HEALTH_HEARTBEAT_MAX_AGE_S,
            stream_stall_s=settings.HEALTH_STREAM_STALL_S,
            stall_when_market_closed=settings.HEALTH_STALL_WHEN_MARKET_CLOSED,
            redis_probe=self._redis_probe,
        )

    def _cached(self, key: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        ttl_s = settings.HEALTH_CACHE_S
        if ttl_s <= 0:
            return compute()
        cache = caches[self._cache_alias]
        report = cache.get(key)
        if report is None:
            report = compute()
            cache.set(key, report, timeout=ttl_s)
        return report

    def business_report(self) -> dict[str, Any]:
        """The full /health report (cached like the view's); also what /metrics exports."""
        return self._cached("tickerproj.health.report", lambda: health_report(self._context()))

    @method_decorator(never_cache)
    @method_decorator(require_GET)
    def live(self, request: HttpRequest) -> JsonResponse:
        """200 while the process answers: what a supervisor restarts on."""
        return JsonResponse(liveness_report())

    @method_decorator(never_cache)
    @method_decorator(require_GET)
    def ready(self, request: HttpRequest) -> JsonResponse:
        """200 when this process can serve (database and Redis): what a load balancer uses."""
        report = self._cached(
            "tickerproj.health.ready", lambda: readiness_report(self._context())
        )
        return JsonResponse(report, status=200 if report["status"] == "ready" else 503)

    @method_decorator(never_cache)
    @method_decorator(require_GET)
    def report(self, request: HttpRequest) -> JsonResponse:
        """200 when everything is live, 503 with the reasons otherwise: for monitoring."""
        report = self.business_report()
        status = 200 if report["status"] == "ok" else 503
        detailed = OpsAccess.from_settings(settings).allows(
            user=request.user,
            client_host=request.META.get("REMOTE_ADDR"),
            authorization=request.headers.get("Authorization"),
            forwarded=carries_forwarding(request.headers),
        )
        return JsonResponse(report if detailed else health_report_public(report), status=status)


CHAIN_STRIKE_CHOICES = (5, 10, 15, 20, 30, 50)
CHAIN_DEFAULT_STRIKES = 15
_PREFERRED_UNDERLYING = "NIFTY"

# Shown as tooltips on the page's flag badges; labels come from the flag names themselves.
_FLAG_HINTS = {
    Flag.BELOW_INTRINSIC: "premium at or below intrinsic value: no volatility fits",
    Flag.ABOVE_MAX: "premium above the no-arbitrage maximum",
    Flag.EXPIRED: "past expiry",
    Flag.NO_PRICE: "no usable premium yet",
    Flag.NO_FORWARD: "no usable forward (no future, no parity pair)",
    Flag.STALE_UNDERLYING: "the underlying/forward is stale",
    Flag.LOW_VEGA: "vega too small: a tick moves the IV too much to trust it",
    Flag.NO_CONVERGENCE: "the IV solver did not converge",
    Flag.BAD_INPUT: "strike, time or rate is not a finite number",
    Flag.SPOT_FALLBACK: "Black-Scholes on spot, not Black-76 on a forward",
    Flag.PAIR_IV: "ITM option carrying the IV of its OTM pair",
}


def _flag_vocabulary() -> dict[str, dict]:
    return {
        flag.name.lower(): {
            "label": flag.name.lower().replace("_", " "),
            "failure": bool(flag & FAILURE_FLAGS),
            "hint": _FLAG_HINTS.get(flag, ""),
        }
        for flag in Flag
        if flag.value and flag.name
    }


@login_required
@require_GET
def chain_page(request: HttpRequest) -> HttpResponse:
    """The live option chain of one underlying and expiry (data arrives over the WebSocket)."""
    underlyings = instrument_list_underlyings()
    underlying = request.GET.get("underlying", "")
    if underlying not in underlyings:
        underlying = (
            _PREFERRED_UNDERLYING
            if _PREFERRED_UNDERLYING in underlyings
            else (underlyings[0] if underlyings else "")
        )
    today = timezone.localdate()
    expiries = (
        instrument_list_expiries(underlying=underlying, on_or_after=today) if underlying else []
    )
    expiry = _parse_date(request.GET.get("expiry", ""))
    if expiry not in expiries:
        expiry = expiries[0] if expiries else None
    strikes = _parse_int(request.GET.get("strikes", ""), default=CHAIN_DEFAULT_STRIKES)
    if strikes not in CHAIN_STRIKE_CHOICES:
        strikes = CHAIN_DEFAULT_STRIKES
    context = {
        "underlyings": underlyings,
        "expiries": expiries,
        "underlying": underlying,
        "expiry": expiry,
        "strikes": strikes,
        "strike_choices": CHAIN_STRIKE_CHOICES,
        "chain_config": {
            "wsPath": WS_PATH,
            "underlying": underlying,
            "expiry": expiry.isoformat() if expiry else None,
            "strikesAroundAtm": strikes,
            "flags": _flag_vocabulary(),
            "loginUrl": f"{resolve_url(settings.LOGIN_URL)}?{urlencode({'next': request.get_full_path()})}",
        },
    }
    return render(request, "streaming/chain.html", context)


def _parse_date(value: str) -> dt.date | None:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        return None


def _parse_int(value: str, *, default: int) -> int:
    try:
        return int(value)
    except ValueError:
        return default
