"""What the engine records: underlying bars, chain minutes, account leases, job locks and its
heartbeat."""

from django.db import models


class UnderlyingBar(models.Model):
    """A 1-minute OHLCV bar of an underlying built from ticks; a minute with no tick is a gap.

    A gap is later filled from Kite's historical candles where Kite has the minute
    (``backfilled``; ``streaming.services.bars_backfill``).
    """

    instrument = models.ForeignKey(
        "subscriptions.Instrument", on_delete=models.CASCADE, related_name="bars"
    )
    start = models.DateTimeField(help_text="Start of the minute (exchange time).")
    open = models.FloatField(null=True)
    high = models.FloatField(null=True)
    low = models.FloatField(null=True)
    close = models.FloatField(null=True)
    volume = models.BigIntegerField(default=0)
    tick_count = models.PositiveIntegerField(default=0)
    is_gap = models.BooleanField(default=False, help_text="No tick arrived in this minute.")
    is_mock = models.BooleanField(default=False)
    backfilled = models.BooleanField(
        default=False, help_text="Filled from Kite's historical candles after a gap, not from ticks."
    )
    backfill_checked_at = models.DateTimeField(
        null=True, blank=True,
        help_text="A gap Kite's history was asked for and lacked: it stays a gap, not asked again.",
    )

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["instrument", "start"], name="underlyingbar_uniq"),
            models.CheckConstraint(
                condition=models.Q(is_gap=True) | models.Q(open__isnull=False),
                name="underlyingbar_prices_unless_gap",
            ),
        ]
        ordering = ["instrument", "start"]

    def __str__(self) -> str:
        return f"{self.instrument_id} {self.start:%Y-%m-%d %H:%M}"


class ChainMinute(models.Model):
    """One option chain's ATM IV, straddle and PCR at a minute: the history behind IV rank and
    IV percentile and the intraday series (docs/websocket-protocol.md, "Chain analytics")."""

    underlying = models.CharField(max_length=64, help_text="Derivative name, e.g. NIFTY.")
    expiry = models.DateField()
    minute = models.DateTimeField(help_text="Start of the minute the values were taken in.")
    atm_iv = models.FloatField(null=True, help_text="IV at the ATM strike, a fraction.")
    straddle = models.FloatField(null=True, help_text="ATM call + put premium, rupees.")
    pcr_oi = models.FloatField(null=True, help_text="Puts' OI over calls' OI.")
    is_mock = models.BooleanField(default=False)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["underlying", "expiry", "is_mock", "minute"], name="chainminute_uniq"
            ),
        ]
        ordering = ["underlying", "expiry", "minute"]

    def __str__(self) -> str:
        return f"{self.underlying} {self.expiry} {self.minute:%Y-%m-%d %H:%M}"


class AccountLease(models.Model):
    """Which runticker process streams an account; renewed while it lives, taken over after."""

    account = models.OneToOneField(
        "accounts.KiteAccount", on_delete=models.CASCADE, related_name="lease", primary_key=True
    )
    owner = models.CharField(max_length=200, help_text="Engine id: host, pid and a random suffix.")
    acquired_at = models.DateTimeField()
    renewed_at = models.DateTimeField()
    expires_at = models.DateTimeField(db_index=True)

    def __str__(self) -> str:
        return f"{self.account_id} -> {self.owner}"


class JobLock(models.Model):
    """A named lock with an owner and an expiry, so a periodic job never overlaps itself.

    Beside the account leases (the same owner-and-expiry idea); the table keeps the name it
    was created with in ``subscriptions``.
    """

    name = models.CharField(max_length=100, primary_key=True)
    owner = models.CharField(max_length=200)
    expires_at = models.DateTimeField()

    class Meta:
        db_table = "subscriptions_joblock"

    def __str__(self) -> str:
        return f"{self.name} held by {self.owner}"


class EngineHeartbeat(models.Model):
    """The last state a runticker process reported: per account and per task."""

    engine_id = models.CharField(max_length=200, primary_key=True)
    hostname = models.CharField(max_length=200)
    pid = models.PositiveIntegerField()
    started_at = models.DateTimeField()
    updated_at = models.DateTimeField(db_index=True)
    state = models.JSONField(default=dict)

    def __str__(self) -> str:
        return self.engine_id
