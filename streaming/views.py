"""HTTP views of the streaming app: the service's health and the live option-chain page."""

import datetime as dt
from urllib.parse import urlencode

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render, resolve_url
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from streaming.greeks import FAILURE_FLAGS, Flag
from streaming.health import HealthContext, health_report, health_report_public
from streaming.routing import WS_PATH
from subscriptions.selectors import instrument_list_expiries, instrument_list_underlyings
from tickerproj.access import is_staff_or_direct_loopback


@never_cache
@require_GET
def health(request: HttpRequest) -> JsonResponse:
    """200 when everything is live, 503 with the reasons otherwise.

    Anyone gets the status and the reason codes; only staff and direct loopback clients get
    the details (engine ids, account labels, error texts), which are no business of the public.
    """
    ctx = HealthContext(
        redis_url=settings.REDIS_URL,
        heartbeat_max_age_s=settings.HEALTH_HEARTBEAT_MAX_AGE_S,
        stream_stall_s=settings.HEALTH_STREAM_STALL_S,
    )
    report = health_report(ctx)
    status = 200 if report["status"] == "ok" else 503
    detailed = is_staff_or_direct_loopback(
        user=request.user,
        client_host=request.META.get("REMOTE_ADDR"),
        header_names=request.headers.keys(),
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
