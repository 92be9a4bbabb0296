"""The Kite login flow: send a staff user to Kite's login page, take the request token back.

Kite redirects to the URL registered for the api key's app (set it to
``https://<host>/accounts/kite/callback/``) with ``request_token`` and ``status``, and with
whatever was passed as ``redirect_params``. The account being logged in travels in a signed,
time-limited state kept in the staff user's session; a random nonce travels through Kite and
must come back unchanged, so a callback that this user did not start is refused.
"""

import secrets
from urllib.parse import urlencode

import structlog
from django.conf import settings
from django.contrib import messages
from django.contrib.admin.views.decorators import staff_member_required
from django.contrib.auth.decorators import login_required, permission_required
from django.core import signing
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render, resolve_url
from django.urls import reverse
from django.views.decorators.http import require_GET

from accounts.models import KiteAccount
from accounts.services import AccountLoginError, account_login_complete
from streaming.kite.rest import KiteError, KiteRateLimiter, KiteRestClient

log = structlog.get_logger(__name__)

KITE_LOGIN_SESSION_KEY = "accounts.kite_login"
KITE_LOGIN_STATE_SALT = "accounts.kite_login.state"
KITE_LOGIN_STATE_MAX_AGE_S = 600
"""A login not completed within ten minutes must be started again."""
LOGIN_PERMISSION = "accounts.change_kiteaccount"
"""A Kite login replaces the account's session: only who may change the account may run it."""


def _change_page(account_id: int | None) -> str:
    if account_id is None:
        return reverse("admin:accounts_kiteaccount_changelist")
    return reverse("admin:accounts_kiteaccount_change", args=[account_id])


@staff_member_required
@permission_required(LOGIN_PERMISSION, raise_exception=True)
@require_GET
def kite_login(request: HttpRequest, pk: int) -> HttpResponse:
    """Start a Kite login for one account: remember it, then redirect to Kite."""
    account = get_object_or_404(KiteAccount, pk=pk)
    nonce = secrets.token_urlsafe(16)
    request.session[KITE_LOGIN_SESSION_KEY] = signing.dumps(
        {"account_id": account.pk, "nonce": nonce}, salt=KITE_LOGIN_STATE_SALT
    )
    query = urlencode(
        {"v": "3", "api_key": account.api_key, "redirect_params": urlencode({"state": nonce})}
    )
    log.info("account.login_started", account=account.label, user=request.user.get_username())
    return redirect(f"{settings.KITE_LOGIN_URL}?{query}")


@staff_member_required
@permission_required(LOGIN_PERMISSION, raise_exception=True)
@require_GET
def kite_callback(request: HttpRequest) -> HttpResponse:
    """Kite's redirect after a login: exchange the request token and store the session."""
    signed = request.session.pop(KITE_LOGIN_SESSION_KEY, None)
    if signed is None:
        messages.error(request, "No Kite login in progress: start it from the account's page.")
        return redirect(_change_page(None))
    try:
        state = signing.loads(signed, salt=KITE_LOGIN_STATE_SALT, max_age=KITE_LOGIN_STATE_MAX_AGE_S)
    except signing.BadSignature:
        messages.error(request, "The Kite login took too long or was tampered with: start it again.")
        return redirect(_change_page(None))
    account = KiteAccount.objects.filter(pk=state["account_id"]).first()
    if account is None:
        messages.error(request, "The account being logged in no longer exists.")
        return redirect(_change_page(None))
    if not secrets.compare_digest(request.GET.get("state", ""), state["nonce"]):
        log.warning("account.login_state_mismatch", account=account.label)
        messages.error(request, f"Kite login for {account.label} refused: it was not started here.")
        return redirect(_change_page(account.pk))
    status = request.GET.get("status", "")
    request_token = request.GET.get("request_token", "")
    if status != "success" or not request_token:
        messages.error(request, f"Kite login for {account.label} did not succeed (status {status!r}).")
        return redirect(_change_page(account.pk))

    client = KiteRestClient(
        api_key=account.api_key,
        api_root=settings.KITE_API_ROOT,
        rate_limiter=KiteRateLimiter.from_redis_url(settings.REDIS_URL),
    )
    try:
        with client:
            account_login_complete(account=account, request_token=request_token, client=client)
    except (KiteError, AccountLoginError) as exc:
        # The client redacts the secret and tokens from its errors.
        log.warning("account.login_failed", account=account.label, error=type(exc).__name__)
        messages.error(request, f"Kite login for {account.label} failed: {exc}")
    else:
        messages.success(
            request, f"Logged in to Kite: {account.label} streams until {account.token_expires_at:%d %b %H:%M} IST."
        )
    return redirect(_change_page(account.pk))


@login_required
@require_GET
def positions_page(request: HttpRequest) -> HttpResponse:
    """Net positions with live portfolio Greeks (the document arrives over the WebSocket)."""
    from streaming.routing import WS_PATH

    config = {
        "wsPath": WS_PATH,
        "loginUrl": f"{resolve_url(settings.LOGIN_URL)}?{urlencode({'next': request.get_full_path()})}",
    }
    return render(request, "accounts/positions.html", {"positions_config": config})
