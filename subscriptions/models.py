"""The instrument registry (Kite's dump), what we subscribe to, and who owns each change."""

from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q

MAX_STRIKES_EACH_SIDE = 100
"""201 strikes of calls and puts per expiry: more than any listed chain, far below Kite's limits."""
MAX_HISTORY_DAYS_BACK = 730
"""Two years of candles: an option lives for months; a typo of 32 767 days would not."""


class Instrument(models.Model):
    """One row of Kite's instrument dump, keyed by instrument_token."""

    class Type(models.TextChoices):
        EQUITY = "EQ", "Equity / index"
        FUTURE = "FUT", "Future"
        CALL = "CE", "Call"
        PUT = "PE", "Put"

    instrument_token = models.PositiveBigIntegerField(primary_key=True)
    exchange_token = models.PositiveBigIntegerField()
    tradingsymbol = models.CharField(max_length=64)
    name = models.CharField(max_length=128, blank=True)
    last_price = models.FloatField(default=0.0)
    expiry = models.DateField(null=True, blank=True)
    strike = models.FloatField(default=0.0)
    tick_size = models.FloatField(default=0.05)
    lot_size = models.PositiveIntegerField(default=1)
    instrument_type = models.CharField(max_length=8, choices=Type.choices)
    segment = models.CharField(max_length=16)
    exchange = models.CharField(max_length=8)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["exchange", "tradingsymbol"], name="instrument_exchange_symbol_uniq")
        ]
        indexes = [
            # The option-chain lookup: name + expiry + CE/PE, ordered by strike.
            models.Index(fields=["name", "expiry", "instrument_type", "strike"], name="instrument_chain_idx"),
            models.Index(fields=["tradingsymbol"], name="instrument_symbol_idx"),
            models.Index(fields=["segment", "instrument_type"], name="instrument_segment_type_idx"),
            models.Index(fields=["expiry"], name="instrument_expiry_idx"),
        ]
        ordering = ["exchange", "tradingsymbol"]

    def __str__(self) -> str:
        return f"{self.exchange}:{self.tradingsymbol}"

    @property
    def is_option(self) -> bool:
        return self.instrument_type in (self.Type.CALL, self.Type.PUT)


class Subscription(models.Model):
    """The wish to stream one instrument in one mode; the engine allocates it to an account."""

    class Mode(models.TextChoices):
        LTP = "ltp", "LTP"
        QUOTE = "quote", "Quote"
        FULL = "full", "Full"

    class Status(models.TextChoices):
        ACTIVE = "active", "Active"
        INACTIVE = "inactive", "Inactive"

    class Source(models.TextChoices):
        MANUAL = "manual", "Manual (admin)"
        REBALANCER = "rebalancer", "Strike rebalancer"
        API = "api", "API"

    instrument = models.OneToOneField(
        Instrument, on_delete=models.PROTECT, related_name="subscription"
    )
    mode = models.CharField(max_length=8, choices=Mode.choices, default=Mode.FULL)
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.ACTIVE)
    status_reason = models.CharField(max_length=200, blank=True)
    pinned_account = models.ForeignKey(
        "accounts.KiteAccount",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="pinned_subscriptions",
        help_text="Stream this instrument on this account only.",
    )
    source = models.CharField(max_length=12, choices=Source.choices, default=Source.MANUAL)
    rebalance_rule = models.ForeignKey(
        "RebalanceRule",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="subscriptions",
        help_text="The rule that owns this subscription (source rebalancer).",
    )
    assigned_account = models.ForeignKey(
        "accounts.KiteAccount",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="assigned_subscriptions",
        editable=False,
        help_text="Where the engine streams it now.",
    )
    streamed_mode = models.CharField(
        max_length=8, blank=True, editable=False, help_text="The mode the engine streams it in now."
    )
    unassigned_reason = models.CharField(max_length=200, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        indexes = [
            models.Index(fields=["status", "mode"], name="subscription_status_mode_idx"),
            models.Index(fields=["source", "status"], name="subscription_source_idx"),
            models.Index(fields=["pinned_account", "status"], name="subscription_pinned_idx"),
            models.Index(fields=["assigned_account"], name="subscription_assigned_idx"),
            models.Index(fields=["rebalance_rule", "status"], name="subscription_rule_idx"),
        ]
        constraints = [
            models.CheckConstraint(
                condition=Q(rebalance_rule__isnull=True) | Q(source="rebalancer"),
                name="subscription_rule_implies_rebalancer",
            )
        ]
        ordering = ["-updated_at"]

    def __str__(self) -> str:
        return f"{self.instrument_id} {self.mode} {self.status}"


class RebalanceRule(models.Model):
    """Keep CE/PE strikes around the money subscribed for an underlying's next expiries."""

    name = models.CharField(max_length=64, unique=True)
    underlying = models.CharField(max_length=64, help_text="Instrument name, e.g. NIFTY or BANKNIFTY.")
    expiries_next_n = models.PositiveSmallIntegerField(
        null=True, blank=True, help_text="Follow the next N expiries (leave empty to list them)."
    )
    expiries_explicit = models.JSONField(
        default=list, blank=True, help_text='Explicit ISO dates, e.g. ["2026-11-24"].'
    )
    strikes_each_side = models.PositiveSmallIntegerField(
        default=10, validators=[MaxValueValidator(MAX_STRIKES_EACH_SIDE)]
    )
    mode = models.CharField(max_length=8, choices=Subscription.Mode.choices, default=Subscription.Mode.FULL)
    pinned_account = models.ForeignKey(
        "accounts.KiteAccount", on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    hysteresis_steps = models.FloatField(
        default=0.6, help_text="Move the band only when the price is this many strike steps past its centre."
    )
    cooldown_s = models.PositiveIntegerField(default=300)
    enabled = models.BooleanField(default=True)
    center_strike = models.FloatField(null=True, blank=True, editable=False)
    centers = models.JSONField(
        default=dict,
        blank=True,
        editable=False,
        help_text="The band's centre strike per ISO expiry; center_strike shows the nearest one.",
    )
    last_rebalanced_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_result = models.TextField(blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(
                condition=Q(hysteresis_steps__gte=0) & Q(hysteresis_steps__lte=5),
                name="rebalancerule_hysteresis_range",
            )
        ]

    def __str__(self) -> str:
        return self.name


class HistoryRange(models.Model):
    """A range of an option's candles the history job enriches with Greeks ahead of time."""

    instrument = models.ForeignKey(Instrument, on_delete=models.CASCADE, related_name="+")
    interval = models.CharField(max_length=16, default="minute")
    days_back = models.PositiveSmallIntegerField(
        default=30, validators=[MinValueValidator(1), MaxValueValidator(MAX_HISTORY_DAYS_BACK)]
    )
    enabled = models.BooleanField(default=True)
    last_run_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_result = models.TextField(blank=True, editable=False)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["instrument", "interval"], name="historyrange_uniq")
        ]

    def __str__(self) -> str:
        return f"{self.instrument_id} {self.interval} {self.days_back}d"


class CandleGreeks(models.Model):
    """One historical candle of an option with the Greeks computed for it."""

    # No index of its own: the unique (instrument, interval, ts) index serves every lookup,
    # and a second index would slow the month-at-a-time writes.
    instrument = models.ForeignKey(
        Instrument, on_delete=models.CASCADE, related_name="+", db_index=False
    )
    interval = models.CharField(max_length=16)
    ts = models.DateTimeField()
    open = models.FloatField()
    high = models.FloatField()
    low = models.FloatField()
    close = models.FloatField()
    volume = models.BigIntegerField()
    oi = models.BigIntegerField(null=True)
    underlying_price = models.FloatField(null=True)
    forward = models.FloatField(null=True)
    iv = models.FloatField(null=True)
    delta = models.FloatField(null=True)
    gamma = models.FloatField(null=True)
    theta = models.FloatField(null=True)
    vega = models.FloatField(null=True)
    rho = models.FloatField(null=True)
    flags = models.PositiveIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["instrument", "interval", "ts"], name="candlegreeks_uniq")
        ]
        ordering = ["instrument", "interval", "ts"]

    def __str__(self) -> str:
        return f"{self.instrument_id} {self.interval} {self.ts:%Y-%m-%d %H:%M}"


class JobRun(models.Model):
    """How the last run of each Celery job ended, for ops in the admin (one row per task)."""

    class Outcome(models.TextChoices):
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"
        RETRIED = "retried", "Retrying"

    task_name = models.CharField(max_length=200, primary_key=True)
    task_id = models.CharField(max_length=64)
    outcome = models.CharField(max_length=12, choices=Outcome.choices)
    finished_at = models.DateTimeField()
    duration_s = models.FloatField(null=True)
    summary = models.TextField(blank=True, help_text="The result, or the error.")

    def __str__(self) -> str:
        return f"{self.task_name} {self.outcome} at {self.finished_at:%Y-%m-%d %H:%M:%S}"


class DriftReport(models.Model):
    """What the reconciler last found between the wanted subscriptions and what engines stream.

    One row per report name (``subscriptions``), overwritten on each run: the admin and
    ``/health`` show the latest finding.
    """

    name = models.CharField(max_length=32, primary_key=True)
    checked_at = models.DateTimeField()
    ok = models.BooleanField()
    desired = models.PositiveIntegerField(help_text="Active subscriptions.")
    streamed = models.PositiveIntegerField(help_text="Active subscriptions an engine assigned.")
    heartbeat_streamed = models.PositiveIntegerField(
        null=True, help_text="What the live engines' heartbeats say they stream."
    )
    engines_alive = models.PositiveSmallIntegerField()
    missing = models.PositiveIntegerField(help_text="Active, not assigned, and no reason given.")
    unassigned = models.PositiveIntegerField(help_text="Active, not assigned, with a reason.")
    extra = models.PositiveIntegerField(help_text="Inactive but still assigned to an account.")
    mode_mismatch = models.PositiveIntegerField(help_text="Streamed in another mode than wanted.")
    summary = models.TextField(blank=True)
    details = models.JSONField(default=dict, blank=True)

    def __str__(self) -> str:
        return f"{self.name} {'ok' if self.ok else 'drift'} at {self.checked_at:%Y-%m-%d %H:%M:%S}"


class HistoryCoverage(models.Model):
    """A span of an option's candles whose Greeks are all stored in CandleGreeks.

    The history endpoint serves a request from the database only when one span covers it.
    """

    instrument = models.ForeignKey(Instrument, on_delete=models.CASCADE, related_name="+")
    interval = models.CharField(max_length=16)
    start = models.DateTimeField()
    end = models.DateTimeField()
    underlying_token = models.PositiveBigIntegerField(
        help_text="The future or index the Greeks were computed against."
    )
    computed_at = models.DateTimeField()

    class Meta:
        indexes = [
            models.Index(fields=["instrument", "interval", "start"], name="historycoverage_span_idx")
        ]
        constraints = [
            models.CheckConstraint(condition=Q(end__gte=models.F("start")), name="historycoverage_ordered")
        ]

    def __str__(self) -> str:
        return f"{self.instrument_id} {self.interval} {self.start:%Y-%m-%d} to {self.end:%Y-%m-%d}"
