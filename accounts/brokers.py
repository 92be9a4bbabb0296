"""The seam between the order services and whoever executes orders: Kite, or the paper engine.

``broker_for(account=...)`` returns a :class:`Broker`: the Kite implementation on
``streaming/kite/rest.py``'s ``KiteRestClient``, or ``accounts.paper.PaperBroker`` for a
paper account. Every broker reports failures as one of three exceptions, because what the
services may do next depends only on which:

- :class:`BrokerRejectedError`: the broker answered no (nothing was placed);
- :class:`BrokerNotSentError`: the request certainly never reached the broker (a connect
  timeout, our own rate limiter): safe to report as not placed;
- :class:`BrokerAmbiguousError`: the request may have reached the broker and the answer was
  lost (read timeout, dropped connection, 5xx, a malformed reply). The order is UNKNOWN until
  the order book says otherwise; it is never blindly re-sent.
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from streaming.kite.redaction import redact
from streaming.kite.rest import (
    KiteApiError,
    KiteError,
    KiteRateLimiter,
    KiteRateLimiterUnavailable,
    KiteRateLimitTimeout,
    KiteResponseError,
    KiteRestClient,
    KiteTokenError,
    KiteTransportError,
)

if TYPE_CHECKING:
    from accounts.models import KiteAccount

PAPER_BROKER = "accounts.paper.PaperBroker"


class BrokerError(Exception):
    """Base of the three outcomes of a failed broker call; the message is free of secrets."""

    def __init__(self, message: str, *, error_type: str = "", status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.error_type = error_type
        self.status = status


class BrokerRejectedError(BrokerError):
    """The broker refused the request (input, order, permission or token error)."""

    @property
    def session_expired(self) -> bool:
        return self.error_type == "TokenException"


class BrokerNotSentError(BrokerError):
    """The request never reached the broker: nothing happened there."""


class BrokerAmbiguousError(BrokerError):
    """The request may have reached the broker; its answer was lost."""


class Broker(Protocol):
    """What the order services need from an executor of orders (Kite's dict shapes)."""

    def place_order(self, *, params: dict[str, Any]) -> str:
        """Place; ``params`` holds ``variety`` and Kite's order fields. Returns the order_id."""

    def modify_order(self, *, order_id: str, params: dict[str, Any]) -> str:
        """Modify; ``params`` holds ``variety`` and the fields to change. Returns the order_id."""

    def cancel_order(self, *, order_id: str, variety: str) -> str: ...

    def orders(self) -> list[dict[str, Any]]: ...

    def trades(self) -> list[dict[str, Any]]: ...

    def positions(self) -> dict[str, list[dict[str, Any]]]: ...


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """Where Kite is and how long an order call may take; read from settings at the edge."""

    api_root: str
    redis_url: str
    timeout_s: float
    rate_limiter: KiteRateLimiter | None = None
    """The REST limiter to share (one Redis client for every call of a request); else one is
    made from ``redis_url``."""

    @classmethod
    def from_settings(cls) -> BrokerConfig:
        from django.conf import settings

        return cls(
            api_root=settings.KITE_API_ROOT, redis_url=settings.REDIS_URL,
            timeout_s=settings.ORDERS_KITE_TIMEOUT_S,
        )  # fmt: skip


def _broker_error(exc: KiteError) -> BrokerError:
    """Which of the three outcomes a REST client failure is."""
    text = str(exc)
    if isinstance(exc, KiteRateLimitTimeout | KiteRateLimiterUnavailable):
        return BrokerNotSentError(text)
    if isinstance(exc, KiteTransportError):
        return (BrokerAmbiguousError if exc.request_sent else BrokerNotSentError)(text)
    if isinstance(exc, KiteApiError):
        status = exc.status or 0
        if exc.error_type == "NetworkException" and status == 429:
            return BrokerNotSentError(text, error_type=exc.error_type, status=status)
        if exc.never_retried or 400 <= status < 500:
            return BrokerRejectedError(text, error_type=exc.error_type, status=status)
        return BrokerAmbiguousError(text, error_type=exc.error_type, status=status)
    if isinstance(exc, KiteResponseError):
        return BrokerAmbiguousError(text)
    return BrokerAmbiguousError(text)


class KiteBroker:
    """A :class:`Broker` on Kite Connect for one account's session.

    Error messages leave with ``secrets`` (the account's api secret; the client already
    redacts its access token) replaced, because they are stored in orders and audits.
    """

    def __init__(self, *, client: KiteRestClient, secrets: tuple[str, ...] = ()) -> None:
        self._client = client
        self._secrets = secrets

    def _error(self, exc: KiteError, *, reading: bool = False) -> BrokerError:
        error = (_reading_error if reading else _broker_error)(exc)
        error.message = redact(error.message, *self._secrets)
        error.args = (error.message,)
        return error

    def place_order(self, *, params: dict[str, Any]) -> str:
        try:
            return self._client.place_order(**params)
        except KiteError as exc:
            raise self._error(exc) from None

    def modify_order(self, *, order_id: str, params: dict[str, Any]) -> str:
        try:
            return self._client.modify_order(order_id=order_id, **params)
        except KiteError as exc:
            raise self._error(exc) from None

    def cancel_order(self, *, order_id: str, variety: str) -> str:
        try:
            return self._client.cancel_order(order_id=order_id, variety=variety)
        except KiteError as exc:
            raise self._error(exc) from None

    def orders(self) -> list[dict[str, Any]]:
        try:
            return [o.model_dump() for o in self._client.orders()]
        except KiteError as exc:
            raise self._error(exc, reading=True) from None

    def trades(self) -> list[dict[str, Any]]:
        try:
            return [t.model_dump() for t in self._client.trades()]
        except KiteError as exc:
            raise self._error(exc, reading=True) from None

    def positions(self) -> dict[str, list[dict[str, Any]]]:
        try:
            return self._client.positions()
        except KiteError as exc:
            raise self._error(exc, reading=True) from None


def _reading_error(exc: KiteError) -> BrokerError:
    """A failed read changes nothing anywhere: only rejected (e.g. token) or not done."""
    if isinstance(exc, KiteTokenError):
        return BrokerRejectedError(str(exc), error_type=exc.error_type, status=exc.status)
    return BrokerNotSentError(str(exc), error_type=getattr(exc, "error_type", ""),
                              status=getattr(exc, "status", None))


class KiteClients:
    """One :class:`KiteRestClient` per account, reused by every order of a process.

    A client holds kiteconnect's ``requests`` session, so reusing it keeps the HTTP
    connection to Kite alive instead of opening one per order (``benchmarks/orders``). A new
    access token (a new login) or api key replaces the account's client and closes the old
    session, so at most one client per account is kept. Keyed by account, not api key: the
    users of one Kite app share its api key, each with their own access token.
    """

    def __init__(self, *, config: BrokerConfig) -> None:
        self._config = config
        self._clients: dict[int | None, tuple[tuple[str, str], KiteRestClient]] = {}
        self._lock = threading.Lock()

    def client_for(self, account: KiteAccount) -> KiteRestClient:
        session = (account.api_key, account.access_token)
        with self._lock:
            held, client = self._clients.get(account.pk, (None, None))
            if client is None or held != session:
                if client is not None:
                    client.close()
                client = _kite_client(account, self._config)
                self._clients[account.pk] = (session, client)
            return client


def _kite_client(account: KiteAccount, config: BrokerConfig) -> KiteRestClient:
    return KiteRestClient(
        api_key=account.api_key, access_token=account.access_token, api_root=config.api_root,
        rate_limiter=config.rate_limiter or KiteRateLimiter.from_redis_url(config.redis_url),
        timeout_s=config.timeout_s,
    )  # fmt: skip


def broker_for(
    *, account: KiteAccount, config: BrokerConfig | None = None, clients: KiteClients | None = None
) -> Broker:
    """The broker that executes ``account``'s orders: paper engine or Kite (on ``clients``'
    reused client when given, else a new one)."""
    if account.is_paper:
        module_name, _, class_name = PAPER_BROKER.rpartition(".")
        paper_broker = getattr(importlib.import_module(module_name), class_name)
        return paper_broker(account=account)
    if clients is not None:
        client = clients.client_for(account)
    else:
        client = _kite_client(account, config or BrokerConfig.from_settings())
    return KiteBroker(client=client, secrets=(account.access_token, account.api_secret))
