"""Broker accounts and API tokens."""

import datetime as dt
import hashlib
import secrets

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.utils import timezone

from accounts.fields import EncryptedTextField
from streaming.greeks import IST
from tickerproj.logging import remember_secret

SESSION_EXPIRY_TIME_IST = dt.time(6, 0)

MARKET_PROTECTION_AUTO = -1
"""Kite's ``market_protection=-1``: Kite picks the protection band itself."""


def default_allowed_exchanges() -> list[str]:
    return ["NSE", "BSE", "NFO", "BFO"]


def default_allowed_products() -> list[str]:
    return ["MIS", "NRML", "CNC"]


def session_expiry_after(issued_at: dt.datetime) -> dt.datetime:
    """Kite access tokens expire at 06:00 IST on the day after they were issued."""
    issued_ist = issued_at.astimezone(IST)
    next_day = issued_ist.date() + dt.timedelta(days=1)
    return dt.datetime.combine(next_day, SESSION_EXPIRY_TIME_IST, tzinfo=IST)


class KiteAccount(models.Model):
    """A Kite Connect app + user whose session streams ticks and calls the REST API."""

    class Status(models.TextChoices):
        ACTIVE = "active", "Active"
        DISABLED = "disabled", "Disabled"
        SESSION_EXPIRED = "session_expired", "Session expired (login needed)"
        ERROR = "error", "Error"

    label = models.CharField(max_length=64, unique=True)
    api_key = models.CharField(max_length=64, unique=True)
    api_secret = EncryptedTextField(blank=True)
    access_token = EncryptedTextField(blank=True)
    kite_user_id = models.CharField(max_length=32, blank=True)
    status = models.CharField(
        max_length=16, choices=Status.choices, default=Status.ACTIVE, db_index=True
    )
    token_issued_at = models.DateTimeField(null=True, blank=True)
    token_expires_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    is_paper = models.BooleanField(
        default=False, help_text="Orders go to the project's own matching engine; nothing reaches Kite."
    )
    traders = models.ManyToManyField(
        settings.AUTH_USER_MODEL, blank=True, related_name="tradable_accounts",
        help_text="Users who may place, modify and cancel orders on this account.",
    )
    # Trading settings and pre-trade checks (docs/orders.md).
    market_protection = models.SmallIntegerField(
        default=MARKET_PROTECTION_AUTO,
        validators=[MinValueValidator(MARKET_PROTECTION_AUTO), MaxValueValidator(100)],
        help_text="Sent with MARKET and SL-M orders: -1 = Kite's automatic protection, "
        "1-100 = percent from the last price, 0 = off (the exchange may reject such orders).",
    )
    allowed_exchanges = models.JSONField(
        default=default_allowed_exchanges, blank=True, help_text="Exchanges orders may go to."
    )
    allowed_products = models.JSONField(
        default=default_allowed_products, blank=True, help_text="Products orders may use."
    )
    max_lots_per_order = models.PositiveIntegerField(
        null=True, blank=True, help_text="Most lots one order may have (empty: no limit)."
    )
    max_notional_per_order = models.DecimalField(
        max_digits=16, decimal_places=2, null=True, blank=True,
        help_text="Most rupees one order may be worth, quantity x price (empty: no limit).",
    )
    daily_loss_cap = models.DecimalField(
        max_digits=16, decimal_places=2, null=True, blank=True,
        help_text="New orders halt once the day's loss (realised + mark-to-market) reaches this (empty: no cap).",
    )
    kill_switch = models.BooleanField(
        default=False, help_text="On: this account takes no new orders (cancels and exits still work)."
    )
    kill_switch_reason = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["label"]

    def __str__(self) -> str:
        return self.label

    def __repr__(self) -> str:
        return f"<KiteAccount {self.pk}: {self.label} ({self.status})>"

    @property
    def needs_login(self) -> bool:
        """True when the account cannot stream until someone logs in to Kite again."""
        if self.status == self.Status.DISABLED:
            return False
        if self.status == self.Status.SESSION_EXPIRED or not self.access_token_is_set:
            return True
        return self.token_expires_at is not None and self.token_expires_at <= timezone.now()

    @property
    def access_token_is_set(self) -> bool:
        return bool(self.__dict__.get("access_token"))

    @property
    def api_secret_is_set(self) -> bool:
        return bool(self.__dict__.get("api_secret"))


class ApiToken(models.Model):
    """A bearer token for programs (HTTP API and WebSocket); only its SHA-256 is stored."""

    PREFIX_LENGTH = 8

    class Scope(models.TextChoices):
        READ = "read", "read: market data, history, bars, status"
        SUBSCRIBE = "subscribe", "subscribe: manage subscriptions"
        TRADE = "trade", "trade: orders"

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens"
    )
    name = models.CharField(max_length=64)
    prefix = models.CharField(max_length=PREFIX_LENGTH, db_index=True, editable=False)
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True)
    scopes = models.JSONField(
        default=list, blank=True, help_text="What the token may do: read, subscribe, trade."
    )

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @staticmethod
    def hash_key(key: str) -> str:
        # Every key is hashed on its way in: from here on the log scrubber knows it.
        remember_secret(key, presented=True)
        return hashlib.sha256(key.encode()).hexdigest()

    @staticmethod
    def new_key() -> str:
        return secrets.token_urlsafe(32)

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes


from accounts.order_models import (  # noqa: E402  (re-exported: Django finds the models here)
    Order,
    OrderAudit,
    OrderPlacement,
    OrderStatus,
    OrderSyncRun,
    PositionSnapshot,
    Trade,
    TradingSwitch,
)

__all__ = [
    "ApiToken", "KiteAccount", "Order", "OrderAudit", "OrderPlacement", "OrderStatus",
    "OrderSyncRun", "PositionSnapshot", "Trade", "TradingSwitch",
]
