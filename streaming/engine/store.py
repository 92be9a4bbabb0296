"""The engine's database reads and writes, run off the event loop.

Everything here is a plain sync function over the ORM (selectors/services style), run through
:func:`run_db` in a worker thread. ``thread_sensitive=False`` so a slow bulk write of 100k
subscriptions never holds up a lease renewal queued behind it; each worker thread closes
unusable connections before and after (healthchecks' sendalerts does the same), so a database
restart costs one failed call, not a stuck engine.
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime as dt
import hashlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog
from asgiref.sync import sync_to_async
from django.db import DatabaseError, DataError, IntegrityError, close_old_connections, transaction
from django.db.models.functions import TruncDate
from django.utils import timezone

from accounts.fields import DecryptionError
from accounts.models import KiteAccount
from accounts.order_services import OrderUpdateError, order_apply_update
from accounts.selectors import account_list_streamable
from accounts.services import account_mark_secret_unreadable, account_mark_session_expired
from streaming.engine.allocator import AccountInfo, Allocation, SubscriptionWish
from streaming.engine.universe import UNIVERSE_FIELDS
from streaming.greeks import IST
from streaming.models import ChainMinute, EngineHeartbeat, UnderlyingBar
from subscriptions.models import Instrument
from subscriptions.selectors import subscription_list_active
from subscriptions.services import subscriptions_save_assignments

log = structlog.get_logger(__name__)

T = TypeVar("T")

StoreError = DatabaseError
#: Errors the same rows raise again on every retry (a constraint, a value out of range).
PermanentStoreError = (IntegrityError, DataError)
"""What a store call raises when the database fails (so engine code needs no Django import)."""

_SHARED_FIELDS = frozenset(UNIVERSE_FIELDS) - {"instrument_token", "tradingsymbol"}
"""Instrument columns whose few distinct values are shared by the rows the engine keeps."""
_BULK_BATCH = 2000
_UPDATE_CHUNK = 10_000


def _in_worker(fn: Callable[..., T], kwargs: Mapping[str, Any]) -> T:
    close_old_connections()
    try:
        return fn(**kwargs)
    finally:
        close_old_connections()


DB_THREADS = 4
"""Threads of the engine's database calls: a frozen PostgreSQL pins at most these."""

# One process-wide pool for every run_db caller (leases, heartbeat, reload, bars): the bound is
# the point, so it cannot be one pool per collaborator. Not the loop's default executor, which
# the pure work (allocation, universe builds) uses: that keeps running while the database hangs.
_db_executor = ThreadPoolExecutor(max_workers=DB_THREADS, thread_name_prefix="engine-db")


async def run_db(fn: Callable[..., T], /, **kwargs: Any) -> T:
    """Run a sync ORM function in one of the engine's database threads, fresh connections."""
    context = contextvars.copy_context()
    return await asyncio.get_running_loop().run_in_executor(
        _db_executor, context.run, _in_worker, fn, kwargs
    )


async def run_db_publishing(fn: Callable[..., T], /, **kwargs: Any) -> T:
    """:func:`run_db` for a write whose after-commit hooks send on the channel layer.

    Through asgiref, the thread knows the engine's event loop, so a hook's ``async_to_sync``
    sends there, on the loop's Redis pool, instead of on a new loop and a new connection
    per call (which costs tens of milliseconds on a loaded machine).
    """
    call = sync_to_async(_in_worker, thread_sensitive=False, executor=_db_executor)
    return await call(fn, kwargs)


# --- what the engine reads ------------------------------------------------------------------


@dataclass(frozen=True)
class AccountRow:
    """An account as the engine needs it; the token is only in memory, never logged."""

    account_id: int
    label: str
    api_key: str
    status: str
    streamable: bool
    access_token: str = field(repr=False, default="")
    #: When the token was stored: a session expiry is recorded only against this login.
    token_issued_at: dt.datetime | None = None
    #: Record this account's raw Kite frames (KiteAccount.record_frames).
    record_frames: bool = False

    @property
    def token_fingerprint(self) -> str:
        """Tells a new login from the old one without comparing secrets in logs."""
        return hashlib.sha256(self.access_token.encode()).hexdigest()[:16]

    def info(self) -> AccountInfo:
        return AccountInfo(
            account_id=self.account_id,
            label=self.label,
            streamable=self.streamable,
            status=self.status,
        )


@dataclass(frozen=True, slots=True)
class SubscriptionRow:
    """An active subscription and what the engine last wrote about it."""

    pk: int
    token: int
    mode: str
    pinned_account_id: int | None
    assigned_account_id: int | None
    streamed_mode: str
    unassigned_reason: str

    def wish(self) -> SubscriptionWish:
        return SubscriptionWish(
            token=self.token,
            mode=self.mode,
            pinned_account_id=self.pinned_account_id,
            current_account_id=self.assigned_account_id,
        )


@dataclass
class World:
    """Accounts and active subscriptions at one moment."""

    accounts: list[AccountRow]
    subscriptions: list[SubscriptionRow]


def world_load() -> World:
    """Every non-disabled account (streamable or not) and every active subscription."""
    streamable_ids = set(account_list_streamable().values_list("pk", flat=True))
    accounts = []
    for acc in KiteAccount.objects.exclude(status=KiteAccount.Status.DISABLED).order_by("pk"):
        streamable = acc.pk in streamable_ids
        access_token = ""
        if streamable:
            # Decrypted only for accounts the engine may stream. One unreadable token (a
            # lost key) takes that account out, not every account with it.
            try:
                access_token = acc.access_token
            except DecryptionError:
                log.error("engine.account_secret_unreadable", account=acc.label)
                account_mark_secret_unreadable(account_id=acc.pk)
                streamable = False
                acc.status = KiteAccount.Status.ERROR
        if streamable or acc.status != KiteAccount.Status.ACTIVE:
            status = acc.status
        elif not acc.access_token_is_set:
            status = "no_access_token"
        else:
            status = "token_expired"
        accounts.append(
            AccountRow(
                account_id=acc.pk,
                label=acc.label,
                api_key=acc.api_key,
                status=status,
                streamable=streamable,
                access_token=access_token,
                token_issued_at=acc.token_issued_at,
                record_frames=acc.record_frames,
            )
        )
    subs = [
        SubscriptionRow(*row)
        for row in subscription_list_active()
        .order_by()
        .values_list(
            "pk",
            "instrument_id",
            "mode",
            "pinned_account_id",
            "assigned_account_id",
            "streamed_mode",
            "unassigned_reason",
        )
        .iterator(chunk_size=10_000)
    ]
    return World(accounts=accounts, subscriptions=subs)


def instruments_load(*, tokens: Iterable[int]) -> list[dict[str, Any]]:
    """The rows (:data:`UNIVERSE_FIELDS`) of the instruments ``tokens``.

    The engine keeps them between reloads, so they are kept small: only the columns the
    universe reads, and one shared object per distinct name, exchange, type, expiry or
    strike (the instrument dump's twelve columns, a copy of each per row, were ~1 KB a row:
    100 MB of runticker's memory at 100k instruments).
    """
    wanted = list(tokens)
    shared: dict[tuple[str, Any], Any] = {}
    rows: list[dict[str, Any]] = []
    for start in range(0, len(wanted), 20_000):
        chunk = wanted[start : start + 20_000]
        for values in Instrument.objects.filter(pk__in=chunk).values_list(*UNIVERSE_FIELDS):
            rows.append({
                name: shared.setdefault((name, value), value) if name in _SHARED_FIELDS else value
                for name, value in zip(UNIVERSE_FIELDS, values, strict=True)
            })
    return rows


def assignments_save(
    *, allocation: Allocation, subscriptions: Sequence[SubscriptionRow]
) -> int:
    """Write where each subscription streams (or why not), only for rows that changed.

    Rows are grouped by what is written (account, mode, reason: a few dozen combinations)
    and each group is one ``UPDATE ... WHERE id IN (...)``: bulk_update's per-row CASE is
    minutes at 100k rows, this is about a second.
    """
    groups: dict[tuple[int | None, str, str], list[int]] = defaultdict(list)
    for sub in subscriptions:
        account_id = allocation.account_of.get(sub.token)
        mode = sub.mode if account_id is not None else ""
        reason = "" if account_id is not None else allocation.unassigned.get(sub.token, "")
        reason = reason[:200]
        if (account_id, mode, reason) != (
            sub.assigned_account_id,
            sub.streamed_mode,
            sub.unassigned_reason,
        ):
            groups[(account_id, mode, reason)].append(sub.pk)
    return subscriptions_save_assignments(groups=groups, chunk=_UPDATE_CHUNK)


def account_expire_session(
    *, account_id: int, reason: str, token_issued_at: dt.datetime | None
) -> bool:
    return account_mark_session_expired(
        account_id=account_id, reason=reason, token_issued_at=token_issued_at
    )


# --- order updates ---------------------------------------------------------------------------

#: ``Order.status_history`` names where each change came from.
TICKER_SOURCE = "ticker"


def order_update_apply(*, account_id: int, update: dict[str, Any]) -> bool:
    """Apply one order update from the account's ticker socket; True if it changed an order.

    Trusted by its channel (Kite's ticker sends a blank checksum). An update the order
    service cannot use is logged and dropped: the socket carried it, nothing else will.
    """
    account = KiteAccount.objects.filter(pk=account_id).first()
    if account is None:
        log.warning("orders.update_for_unknown_account", account_id=account_id)
        return False
    try:
        return order_apply_update(account=account, update=update, source=TICKER_SOURCE) is not None
    except OrderUpdateError as exc:
        log.warning("orders.update_invalid", account=account.label, field=exc.field,
                    order_id=str(update.get("order_id"))[:40])
        return False


# --- heartbeat and bars ---------------------------------------------------------------------


def heartbeat_write(
    *, engine_id: str, hostname: str, pid: int, started_at: dt.datetime, state: dict[str, Any]
) -> None:
    EngineHeartbeat.objects.update_or_create(
        engine_id=engine_id,
        defaults={
            "hostname": hostname,
            "pid": pid,
            "started_at": started_at,
            "updated_at": timezone.now(),
            "state": state,
        },
    )


def heartbeat_prune(*, older_than: dt.datetime) -> int:
    """Forget heartbeats of engines long gone (a killed process leaves its row behind)."""
    deleted, _ = EngineHeartbeat.objects.filter(updated_at__lt=older_than).delete()
    return deleted


def bars_save(*, bars: Sequence[Mapping[str, Any]]) -> int:
    """Store closed 1-minute bars: live bars upserted, gap bars only where the minute is empty.

    A restarted engine may close the same minute again (the upsert). A gap bar never
    replaces a row: the minute is then a live bar or one backfilled from Kite's history.
    """
    if not bars:
        return 0
    live = [UnderlyingBar(**bar) for bar in bars if not bar["is_gap"]]
    gaps = [UnderlyingBar(**bar) for bar in bars if bar["is_gap"]]
    UnderlyingBar.objects.bulk_create(
        live,
        update_conflicts=True,
        unique_fields=["instrument", "start"],
        update_fields=["open", "high", "low", "close", "volume", "tick_count", "is_gap", "is_mock",
                       "backfilled"],
        batch_size=_BULK_BATCH,
    )
    UnderlyingBar.objects.bulk_create(gaps, ignore_conflicts=True, batch_size=_BULK_BATCH)
    return len(live) + len(gaps)


def bars_save_each(*, bars: Sequence[Mapping[str, Any]]) -> list[tuple[Mapping[str, Any], str]]:
    """Save bars one at a time, each in its own transaction; the bars refused for good
    (:data:`PermanentStoreError`), with why. A transient error still raises."""
    refused = []
    for bar in bars:
        try:
            # Its own transaction: a deferred foreign key is checked at this commit.
            with transaction.atomic():
                bars_save(bars=[bar])
        except PermanentStoreError as exc:
            refused.append((bar, f"{type(exc).__name__}: {str(exc)[:200]}"))
    return refused



def chain_minutes_save(*, rows: Sequence[Mapping[str, Any]]) -> int:
    """Upsert chains' minute samples (a restarted engine may sample the same minute again)."""
    if not rows:
        return 0
    ChainMinute.objects.bulk_create(
        [ChainMinute(**row) for row in rows],
        update_conflicts=True,
        unique_fields=["underlying", "expiry", "is_mock", "minute"],
        update_fields=["atm_iv", "straddle", "pcr_oi"],
        batch_size=_BULK_BATCH,
    )
    return len(rows)


def chain_minute_daily_iv(
    *, today: dt.date, window_days: int
) -> dict[tuple[str, dt.date, bool], list[float]]:
    """Per chain not yet expired: the ATM IV of the last stored minute of each day (IST)
    from ``window_days`` before ``today`` up to, not including, ``today``."""
    start = dt.datetime.combine(today - dt.timedelta(days=window_days), dt.time(0), tzinfo=IST)
    end = dt.datetime.combine(today, dt.time(0), tzinfo=IST)
    rows = (
        ChainMinute.objects.filter(
            minute__gte=start, minute__lt=end, expiry__gte=today, atm_iv__isnull=False
        )
        .annotate(day=TruncDate("minute", tzinfo=IST))
        .order_by("underlying", "expiry", "is_mock", "day", "-minute")
        .distinct("underlying", "expiry", "is_mock", "day")
        .values_list("underlying", "expiry", "is_mock", "day", "atm_iv")
    )
    daily: dict[tuple[str, dt.date, bool], list[float]] = defaultdict(list)
    for underlying, expiry, is_mock, _, atm_iv in rows:
        daily[(underlying, expiry, is_mock)].append(atm_iv)
    return dict(daily)
