"""Which runticker process streams each account: a lease row per account, renewed while alive.

Multi-instance safety comes from conditional UPDATEs, not locks (healthchecks' sendalerts
style): a process takes an account's lease when the row has expired or is already its own,
and checks the row count. Times come from the database clock (``Now()``), so servers with
skewed clocks still agree on when a lease expires.

The guard that keeps Kite's 3-connections-per-api_key limit during a takeover is local: a
process trusts a lease only until ``request start + ttl - margin`` by its monotonic clock, and
when that passes without a successful renewal it stops the account's connections, which is
before the row's ``expires_at`` (set from a later database clock) lets anyone else take it.

Besides accounts, one engine at a time holds the "mock pool" job lock (``JobLock`` row): in
mock mode it alone drives the subscriptions no account can stream, so two engines never
publish two different synthetic markets for the same instrument.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import structlog
from django.db import DatabaseError, IntegrityError, transaction
from django.db.models import Case, DateTimeField, ExpressionWrapper, F, Q, Value, When
from django.db.models.functions import Now

from accounts.selectors import account_list_streamable
from streaming.engine.store import run_db
from streaming.locks import joblock_acquire, joblock_release
from streaming.models import AccountLease

log = structlog.get_logger(__name__)

MOCK_POOL_LOCK = "runticker.mock_pool"
"""JobLock name of the engine that mocks the subscriptions no account can stream."""


ENGINE_ID_MAX_CHARS = 200
"""AccountLease.owner and EngineHeartbeat.engine_id are this long."""


def make_engine_id(prefix: str = "") -> str:
    """``prefix`` (default host:pid) and a random suffix: unique per process start.

    The suffix is always there: pids are reused across restarts, and two processes started
    with the same ``prefix`` would otherwise both match a lease's owner and stream the same
    accounts.
    """
    suffix = secrets.token_hex(4)
    base = prefix or f"{socket.gethostname()}:{os.getpid()}"
    return f"{base[: ENGINE_ID_MAX_CHARS - len(suffix) - 1]}:{suffix}"


def _expires_in(ttl_s: float) -> ExpressionWrapper:
    return ExpressionWrapper(
        Now() + Value(dt.timedelta(seconds=ttl_s)), output_field=DateTimeField()
    )


# --- database operations (sync; run in a worker thread through run_db) -----------------------


def lease_try_acquire(*, account_id: int, owner: str, ttl_s: float) -> bool:
    """Take or renew the account's lease for ``owner``; True if ``owner`` holds it now.

    Only an account the database says is streamable now is taken: one whose session another
    engine just saw Kite refuse is released by that engine, and must not be taken (and its
    refused token tried again) by one that has not reloaded since.
    """
    streamable = account_list_streamable().filter(pk=account_id)
    taken = (
        AccountLease.objects.filter(account_id=account_id, account__in=streamable)
        .filter(Q(expires_at__lt=Now()) | Q(owner=owner))
        .update(
            acquired_at=Case(When(owner=owner, then=F("acquired_at")), default=Now()),
            owner=owner,
            renewed_at=Now(),
            expires_at=_expires_in(ttl_s),
        )
    )
    if taken:
        return True
    if not streamable.exists():
        return False
    try:
        # A savepoint: losing the INSERT race must not break a caller's transaction.
        with transaction.atomic():
            AccountLease.objects.create(
                account_id=account_id,
                owner=owner,
                acquired_at=Now(),
                renewed_at=Now(),
                expires_at=_expires_in(ttl_s),
            )
    except IntegrityError:
        # Either another process holds it or the account was deleted meanwhile.
        return False
    return True


def lease_renew(*, account_ids: Iterable[int], owner: str, ttl_s: float) -> set[int]:
    """Extend the leases ``owner`` still holds among ``account_ids``; returns those held.

    A lease of ours that expired but that no one took is renewed too: it is still ours.
    """
    ids = list(account_ids)
    if not ids:
        return set()
    with transaction.atomic():
        AccountLease.objects.filter(account_id__in=ids, owner=owner).update(
            renewed_at=Now(), expires_at=_expires_in(ttl_s)
        )
        return set(
            AccountLease.objects.filter(account_id__in=ids, owner=owner).values_list(
                "account_id", flat=True
            )
        )


def lease_release(*, account_ids: Iterable[int], owner: str) -> int:
    """Give leases back at once so another process can take them without waiting."""
    ids = list(account_ids)
    if not ids:
        return 0
    deleted, _ = AccountLease.objects.filter(account_id__in=ids, owner=owner).delete()
    return deleted


def lease_owners() -> dict[int, tuple[str, dt.datetime]]:
    """account_id -> (owner, expires_at) of every lease row."""
    return {
        aid: (owner, expires)
        for aid, owner, expires in AccountLease.objects.values_list(
            "account_id", "owner", "expires_at"
        )
    }


# --- the manager --------------------------------------------------------------------------


@dataclass
class _Held:
    valid_until_monotonic: float


LeaseCallback = Callable[[int], Awaitable[None]]


class LeaseManager:
    """Keeps the leases of the accounts this engine wants; tells the engine what it gained/lost.

    ``on_acquired(account_id)`` runs after a lease is taken and must return quickly (renewals
    wait for it); ``on_lost(account_id)`` runs when a lease is lost or about to lapse, and must
    stop the account's connections before it returns. ``run()`` is the supervised loop.
    """

    def __init__(
        self,
        *,
        owner: str,
        ttl_s: float,
        on_acquired: LeaseCallback,
        on_lost: LeaseCallback,
        on_mock_pool: Callable[[bool], Awaitable[None]] | None = None,
        check_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_s < 3.0:
            raise ValueError(f"lease ttl_s must be at least 3 s, got {ttl_s}")
        self.owner = owner
        self.ttl_s = ttl_s
        self.renew_every_s = ttl_s / 3.0
        # Stop connections this long before the row can expire: room to close them.
        self.margin_s = ttl_s / 3.0
        self._on_acquired = on_acquired
        self._on_lost = on_lost
        self._on_mock_pool = on_mock_pool
        self._check_interval_s = check_interval_s
        self._clock = clock
        self._wanted: set[int] = set()
        self._held: dict[int, _Held] = {}
        self._mock_pool_until: float | None = None
        self._last_round_monotonic = float("-inf")
        self._wake = asyncio.Event()
        self._closed = False

    # --- what the engine tells it ----------------------------------------------------------

    def set_wanted(self, account_ids: Iterable[int]) -> None:
        """The accounts this engine would stream (streamable, within --accounts)."""
        wanted = set(account_ids)
        if wanted != self._wanted:
            self._wanted = wanted
            self._wake.set()

    @property
    def held(self) -> set[int]:
        return set(self._held)

    @property
    def holds_mock_pool(self) -> bool:
        return self._mock_pool_until is not None

    def holds(self, account_id: int) -> bool:
        return account_id in self._held

    # --- the loop -------------------------------------------------------------------------

    async def run(self) -> None:
        """Renew every ttl/3, take wanted leases, and drop any about to lapse."""
        while not self._closed:
            await self._expire_local()
            now = self._clock()
            if self._wake.is_set() or now - self._last_round_monotonic >= self.renew_every_s:
                self._wake.clear()
                self._last_round_monotonic = now
                await self._round()
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
            # that lands as its inner wait ends, and this loop wakes every check interval.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._check_interval_s):
                    await self._wake.wait()

    async def _round(self) -> None:
        started = self._clock()
        valid_until = started + self.ttl_s - self.margin_s
        # Renew what we hold.
        held_ids = list(self._held)
        if held_ids:
            still = await self._db(
                lease_renew, account_ids=held_ids, owner=self.owner, ttl_s=self.ttl_s
            )
            if still is not None:
                lost = []
                for aid in held_ids:
                    if aid in still:
                        self._held[aid].valid_until_monotonic = valid_until
                    else:
                        log.warning("lease.lost", account_id=aid, owner=self.owner)
                        lost.append(aid)
                await self._lose_all(lost)
        # Give back what we no longer want (an account disabled or outside --accounts).
        unwanted = [aid for aid in self._held if aid not in self._wanted]
        await self._lose_all(unwanted)
        if unwanted:
            await self._db(lease_release, account_ids=unwanted, owner=self.owner)
        # Take what we want and do not hold.
        for aid in sorted(self._wanted - set(self._held)):
            got = await self._db(
                lease_try_acquire, account_id=aid, owner=self.owner, ttl_s=self.ttl_s
            )
            if got:
                self._held[aid] = _Held(valid_until_monotonic=valid_until)
                log.info("lease.acquired", account_id=aid, owner=self.owner)
                await self._on_acquired(aid)
        await self._round_mock_pool(valid_until)

    async def _round_mock_pool(self, valid_until: float) -> None:
        if self._on_mock_pool is None:
            return
        got = await self._db(
            joblock_acquire, name=MOCK_POOL_LOCK, owner=self.owner, ttl_s=self.ttl_s
        )
        had = self._mock_pool_until is not None
        if got:
            self._mock_pool_until = valid_until
            if not had:
                log.info("lease.mock_pool_acquired", owner=self.owner)
                await self._on_mock_pool(True)
        elif got is False and had:
            self._mock_pool_until = None
            log.info("lease.mock_pool_lost", owner=self.owner)
            await self._on_mock_pool(False)

    async def _expire_local(self) -> None:
        """Stop streaming accounts whose lease we could not renew in time."""
        now = self._clock()
        lapsing = [aid for aid, held in self._held.items() if now >= held.valid_until_monotonic]
        for aid in lapsing:
            log.error("lease.lapsing", account_id=aid, owner=self.owner)
        await self._lose_all(lapsing)
        if self._mock_pool_until is not None and now >= self._mock_pool_until:
            self._mock_pool_until = None
            if self._on_mock_pool is not None:
                await self._on_mock_pool(False)

    async def _lose_all(self, account_ids: list[int]) -> None:
        """Forget these leases and stop their accounts, all at once (each close is bounded)."""
        gone = [aid for aid in account_ids if self._held.pop(aid, None) is not None]
        if gone:
            await asyncio.gather(*(self._on_lost(aid) for aid in gone))

    async def _db(self, fn, **kwargs):
        """A lease query with a deadline; None when the database did not answer in time."""
        try:
            async with asyncio.timeout(self.renew_every_s):
                return await run_db(fn, **kwargs)
        except TimeoutError:
            log.warning("lease.db_timeout", op=fn.__name__, owner=self.owner)
        except DatabaseError as exc:
            log.warning("lease.db_error", op=fn.__name__, owner=self.owner, error=repr(exc))
        return None

    async def release_all(self) -> None:
        """On shutdown, after the connections are closed: hand every lease over at once."""
        self._closed = True
        ids = list(self._held)
        await self._lose_all(ids)
        if ids:
            await self._db(lease_release, account_ids=ids, owner=self.owner)
        if self._mock_pool_until is not None and self._on_mock_pool is not None:
            self._mock_pool_until = None
            await self._db(joblock_release, name=MOCK_POOL_LOCK, owner=self.owner)
        log.info("lease.released_all", accounts=ids, owner=self.owner)
