"""Orders, trades, position snapshots and the audit of every order action (issue 17).

Re-exported from ``accounts/models.py`` so Django finds them. Only ``accounts/order_services.py``
writes an order's state (``order_apply_update``); everything here is storage and small derived
properties. docs/orders.md describes the life of an order.
"""

from __future__ import annotations

from typing import Final

from django.conf import settings
from django.db import models

TAG_MAX_LENGTH: Final = 20
"""Kite's order ``tag``: alphanumeric, at most 20 characters."""

IDEMPOTENCY_KEY_MAX_LENGTH: Final = 128


class OrderStatus(models.TextChoices):
    """Kite's order statuses as Kite spells them, plus our own PENDING and UNKNOWN."""

    PENDING = "PENDING", "PENDING: stored, not yet sent to Kite"
    UNKNOWN = "UNKNOWN", "UNKNOWN: sent, Kite's answer was lost (resolved from the order book)"
    PUT_ORDER_REQ_RECEIVED = "PUT ORDER REQ RECEIVED", "PUT ORDER REQ RECEIVED"
    VALIDATION_PENDING = "VALIDATION PENDING", "VALIDATION PENDING"
    OPEN_PENDING = "OPEN PENDING", "OPEN PENDING"
    AMO_REQ_RECEIVED = "AMO REQ RECEIVED", "AMO REQ RECEIVED"
    TRIGGER_PENDING = "TRIGGER PENDING", "TRIGGER PENDING"
    OPEN = "OPEN", "OPEN"
    MODIFY_VALIDATION_PENDING = "MODIFY VALIDATION PENDING", "MODIFY VALIDATION PENDING"
    MODIFY_PENDING = "MODIFY PENDING", "MODIFY PENDING"
    MODIFIED = "MODIFIED", "MODIFIED"
    CANCEL_PENDING = "CANCEL PENDING", "CANCEL PENDING"
    UPDATE = "UPDATE", "UPDATE"
    COMPLETE = "COMPLETE", "COMPLETE"
    CANCELLED = "CANCELLED", "CANCELLED"
    REJECTED = "REJECTED", "REJECTED"


TERMINAL_STATUSES: Final = frozenset(
    {OrderStatus.COMPLETE, OrderStatus.CANCELLED, OrderStatus.REJECTED}
)
"""An order in one of these never changes again."""

OPEN_STATUSES: Final = frozenset(
    {
        OrderStatus.PUT_ORDER_REQ_RECEIVED, OrderStatus.VALIDATION_PENDING,
        OrderStatus.OPEN_PENDING, OrderStatus.AMO_REQ_RECEIVED, OrderStatus.TRIGGER_PENDING,
        OrderStatus.OPEN, OrderStatus.MODIFY_VALIDATION_PENDING, OrderStatus.MODIFY_PENDING,
        OrderStatus.MODIFIED, OrderStatus.CANCEL_PENDING, OrderStatus.UPDATE,
    }
)  # fmt: skip
"""At Kite and still working: what "cancel all open orders" cancels."""


class OrderPlacement(models.Model):
    """One ``POST /api/v1/orders`` under one ``Idempotency-Key``: the request and its answer.

    Stored before anything is sent; the answer (``response_status``/``response_body``) is
    stored once, and every later POST with the same key gets exactly that answer back. A
    large order sliced within the exchange's freeze quantity is one placement with several
    orders.
    """

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="order_placements"
    )
    account = models.ForeignKey(
        "accounts.KiteAccount", on_delete=models.PROTECT, related_name="order_placements"
    )
    idempotency_key = models.CharField(max_length=IDEMPOTENCY_KEY_MAX_LENGTH)
    fingerprint = models.CharField(
        max_length=64, help_text="SHA-256 of the request body: a reused key with another body is refused."
    )
    request = models.JSONField(help_text="The validated order parameters.")
    response_status = models.PositiveSmallIntegerField(null=True, blank=True)
    response_body = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["user", "idempotency_key"], name="orderplacement_user_key_unique"
            )
        ]

    def __str__(self) -> str:
        return f"placement {self.idempotency_key} ({self.account_id})"


class Order(models.Model):
    """An order at Kite (or the paper engine), as far as we know it."""

    account = models.ForeignKey(
        "accounts.KiteAccount", on_delete=models.PROTECT, related_name="orders"
    )
    placement = models.ForeignKey(
        OrderPlacement, null=True, blank=True, on_delete=models.PROTECT, related_name="orders",
        help_text="Empty for an order placed elsewhere (Kite's web, another app) and recorded from its updates.",
    )
    slice_index = models.PositiveSmallIntegerField(
        default=0, help_text="Which slice of its placement (a large order is sent as several)."
    )
    # NULL, not "", until known: (account, kite_order_id) is unique among the known ones.
    kite_order_id = models.CharField(max_length=32, null=True, blank=True)  # noqa: DJ001
    exchange_order_id = models.CharField(max_length=64, blank=True)
    parent_order_id = models.CharField(max_length=32, blank=True)
    tag = models.CharField(  # noqa: DJ001 (NULL for an order recorded without a tag)
        max_length=TAG_MAX_LENGTH, null=True, blank=True,
        help_text="Sent to Kite as the order tag: how an order whose answer was lost is found.",
    )
    request = models.JSONField(default=dict, help_text="The parameters sent to Kite.")
    variety = models.CharField(max_length=16, default="regular")
    exchange = models.CharField(max_length=8, blank=True)
    tradingsymbol = models.CharField(max_length=64, blank=True)
    instrument_token = models.BigIntegerField(null=True, blank=True)
    transaction_type = models.CharField(max_length=4, blank=True)
    order_type = models.CharField(max_length=8, blank=True)
    product = models.CharField(max_length=8, blank=True)
    quantity = models.PositiveIntegerField(default=0)
    price = models.DecimalField(max_digits=14, decimal_places=4, default=0)
    trigger_price = models.DecimalField(max_digits=14, decimal_places=4, default=0)
    status = models.CharField(
        max_length=32, choices=OrderStatus.choices, default=OrderStatus.PENDING, db_index=True
    )
    status_message = models.TextField(blank=True, help_text="Kite's reason, e.g. for a rejection.")
    status_history = models.JSONField(default=list, blank=True)
    filled_quantity = models.PositiveIntegerField(default=0)
    pending_quantity = models.PositiveIntegerField(default=0)
    cancelled_quantity = models.PositiveIntegerField(default=0)
    average_price = models.DecimalField(max_digits=14, decimal_places=4, default=0)
    order_timestamp = models.DateTimeField(null=True, blank=True)
    exchange_timestamp = models.DateTimeField(null=True, blank=True)
    exchange_update_timestamp = models.DateTimeField(null=True, blank=True)
    modification_count = models.PositiveSmallIntegerField(default=0)
    send_attempts = models.PositiveSmallIntegerField(
        default=0, help_text="Placements sent to Kite: more than one only after Kite was shown to have none."
    )
    sent_at = models.DateTimeField(null=True, blank=True, help_text="When the last placement was sent.")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-pk"]
        constraints = [
            # Our tags are unique; other apps may reuse theirs on orders recorded from updates.
            models.UniqueConstraint(
                fields=["tag"], condition=models.Q(placement__isnull=False), name="order_tag_unique"
            ),
            models.UniqueConstraint(
                fields=["account", "kite_order_id"], name="order_account_kite_id_unique"
            ),
            models.UniqueConstraint(
                fields=["placement", "slice_index"], name="order_placement_slice_unique"
            ),
        ]
        indexes = [models.Index(fields=["account", "status"], name="order_account_status")]
        permissions = [("trade", "Can place, modify and cancel orders on granted accounts")]

    def __str__(self) -> str:
        return f"order {self.kite_order_id or self.tag} {self.status}"

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def is_open(self) -> bool:
        return self.status in OPEN_STATUSES


class Trade(models.Model):
    """A fill of an order, as Kite reports it; one row per (account, trade_id)."""

    account = models.ForeignKey(
        "accounts.KiteAccount", on_delete=models.PROTECT, related_name="trades"
    )
    order = models.ForeignKey(
        Order, null=True, blank=True, on_delete=models.PROTECT, related_name="trades"
    )
    trade_id = models.CharField(max_length=32)
    kite_order_id = models.CharField(max_length=32)
    exchange_order_id = models.CharField(max_length=64, blank=True)
    exchange = models.CharField(max_length=8)
    tradingsymbol = models.CharField(max_length=64)
    instrument_token = models.BigIntegerField(null=True, blank=True)
    product = models.CharField(max_length=8, blank=True)
    transaction_type = models.CharField(max_length=4)
    quantity = models.PositiveIntegerField()
    average_price = models.DecimalField(max_digits=14, decimal_places=4)
    fill_timestamp = models.DateTimeField(null=True, blank=True)
    exchange_timestamp = models.DateTimeField(null=True, blank=True)
    source = models.CharField(max_length=16)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-pk"]
        constraints = [
            models.UniqueConstraint(fields=["account", "trade_id"], name="trade_account_id_unique")
        ]

    def __str__(self) -> str:
        return f"trade {self.trade_id} {self.transaction_type} {self.quantity} {self.tradingsymbol}"


class PositionSnapshot(models.Model):
    """An account's positions as Kite (or the paper engine) reported them at one moment."""

    account = models.ForeignKey(
        "accounts.KiteAccount", on_delete=models.CASCADE, related_name="position_snapshots"
    )
    taken_at = models.DateTimeField(db_index=True)
    net = models.JSONField(default=list, help_text="Kite's net positions.")
    day = models.JSONField(default=list, help_text="Kite's day positions.")
    source = models.CharField(max_length=16)

    class Meta:
        ordering = ["-taken_at"]
        get_latest_by = "taken_at"

    def __str__(self) -> str:
        return f"positions of {self.account_id} at {self.taken_at:%Y-%m-%d %H:%M:%S}"


class OrderAudit(models.Model):
    """One order action: who (user, token prefix), from where, the request, Kite's answer.

    Written for every action, refused or not. Never holds an access token or API secret: the
    request is the validated order parameters and the answer is Kite's redacted reply.
    """

    class Action(models.TextChoices):
        PLACE = "place", "place"
        MODIFY = "modify", "modify"
        CANCEL = "cancel", "cancel"
        EXIT = "exit", "exit"
        CANCEL_ALL = "cancel_all", "cancel all open orders"
        SQUARE_OFF = "square_off", "square off all positions"
        RESEND = "resend", "re-send (Kite shown to have no order with the tag)"
        RESOLVE = "resolve", "resolve an unknown order"
        KILL_SWITCH = "kill_switch", "kill switch"

    class Outcome(models.TextChoices):
        OK = "ok", "ok"
        REFUSED = "refused", "refused by us (nothing sent)"
        REJECTED = "rejected", "rejected by Kite"
        UNKNOWN = "unknown", "unknown (answer lost)"

    account = models.ForeignKey(
        "accounts.KiteAccount", null=True, blank=True, on_delete=models.PROTECT, related_name="order_audits"
    )
    order = models.ForeignKey(
        Order, null=True, blank=True, on_delete=models.PROTECT, related_name="audits"
    )
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT,
        related_name="order_audits",
    )
    token_prefix = models.CharField(max_length=8, blank=True)
    origin = models.CharField(max_length=16, help_text="api, admin or task.")
    remote_addr = models.GenericIPAddressField(null=True, blank=True)
    action = models.CharField(max_length=16, choices=Action.choices)
    outcome = models.CharField(max_length=16, choices=Outcome.choices)
    error_code = models.CharField(max_length=48, blank=True)
    request = models.JSONField(default=dict, blank=True)
    response = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-pk"]

    def __str__(self) -> str:
        return f"{self.action} {self.outcome} ({self.created_at:%Y-%m-%d %H:%M:%S})"


class OrderSyncRun(models.Model):
    """One pull of an account's orders, trades and positions, and what it had to correct."""

    class Trigger(models.TextChoices):
        SCHEDULE = "schedule", "schedule"
        RECONNECT = "reconnect", "ticker reconnect"
        MANUAL = "manual", "manual"

    class Status(models.TextChoices):
        RUNNING = "running", "running"
        OK = "ok", "ok"
        FAILED = "failed", "failed"

    account = models.ForeignKey(
        "accounts.KiteAccount", on_delete=models.CASCADE, related_name="order_sync_runs"
    )
    trigger = models.CharField(max_length=16, choices=Trigger.choices)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.RUNNING)
    started_at = models.DateTimeField()
    finished_at = models.DateTimeField(null=True, blank=True)
    orders_seen = models.PositiveIntegerField(default=0)
    trades_seen = models.PositiveIntegerField(default=0)
    corrections = models.JSONField(default=list, blank=True)
    error = models.TextField(blank=True)

    class Meta:
        ordering = ["-started_at"]

    def __str__(self) -> str:
        return f"sync of {self.account_id} at {self.started_at:%Y-%m-%d %H:%M:%S} ({self.status})"


class TradingSwitch(models.Model):
    """The global kill switch: one row; when ``halted``, no account takes new orders."""

    SINGLETON_PK: Final = 1

    halted = models.BooleanField(default=False)
    reason = models.CharField(max_length=200, blank=True)
    changed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    changed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "global kill switch"
        verbose_name_plural = "global kill switch"

    def __str__(self) -> str:
        return "trading halted" if self.halted else "trading allowed"
