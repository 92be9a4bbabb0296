"""Kite REST clients for jobs and views that act for the service rather than for one account.

The instrument dump, quotes and candles are the same whichever account asks, so these use the
first account with a usable session. Settings are passed in by the caller (the task or view).
"""

from __future__ import annotations

from accounts.models import KiteAccount
from accounts.selectors import account_list_streamable
from streaming.kite.rest import KiteRateLimiter, KiteRestClient


class NoKiteSessionError(Exception):
    """No account has a valid Kite session: someone has to log in first."""


def rest_client_for_service(
    *, api_root: str, redis_url: str, account: KiteAccount | None = None
) -> KiteRestClient:
    """A REST client on ``account`` or, by default, the first streamable account."""
    account = account or account_list_streamable().first()
    if account is None:
        raise NoKiteSessionError(
            "no Kite account with a valid session: log in to Kite from the admin first"
        )
    return KiteRestClient(
        api_key=account.api_key,
        access_token=account.access_token,
        api_root=api_root,
        rate_limiter=KiteRateLimiter.from_redis_url(redis_url),
    )
