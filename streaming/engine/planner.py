"""What this process streams: accounts, modes, the allocation and the plan made of them.

:class:`StreamPlanner` loads the world (accounts and subscriptions), allocates, writes the
assignments back, and applies the plan for a mode: Kite connections per held account, the
mock feed, and the pipeline's universe (exactly what this process streams, so it never
answers a snapshot request with state it stopped receiving). It also keeps which accounts
Kite refused, until a new login.

What streams where:
- live mode: every account this process holds a lease on streams its allocation over its
  Kite connections; nothing is mocked;
- mock mode: no Kite connection; the synthetic market drives the instruments of the accounts
  this process holds, plus, for the one process holding the mock-pool lock, the
  subscriptions no account can stream (so the demo with no accounts still shows them all).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from streaming.engine.allocator import Allocation, allocate
from streaming.engine.connections import ConnectionManager
from streaming.engine.leases import LeaseManager
from streaming.engine.market_hours import EngineMode
from streaming.engine.metrics import EngineMetrics
from streaming.engine.mockfeed import MockFeed
from streaming.engine.reloader import ReloadTrigger
from streaming.engine.store import (
    AccountRow,
    World,
    account_expire_session,
    assignments_save,
    instruments_load,
    run_db,
    world_load,
)
from streaming.engine.supervisor import Supervisor
from streaming.engine.universe import InstrumentUniverse
from streaming.engine.worker import AccountTicks, PipelineWorker, TickIntake
from streaming.status import AccountStatus

log = structlog.get_logger(__name__)

@dataclass
class StreamPlan:
    """What this process streams: per held account its connections, and what it mocks."""

    accounts: dict[int, list[dict[int, str]]] = field(default_factory=dict)
    mock: dict[int, str] = field(default_factory=dict)

    def tokens(self) -> set[int]:
        out = set(self.mock)
        for conns in self.accounts.values():
            for conn in conns:
                out.update(conn)
        return out


def plan_streams(
    *,
    allocation: Allocation,
    modes: Mapping[int, str],
    held: Iterable[int],
    mode: EngineMode,
    holds_mock_pool: bool,
) -> StreamPlan:
    """The pure decision of what to stream live and what to mock, from the allocation."""
    plan = StreamPlan()
    held_set = set(held)
    if mode == "live":
        for aid in sorted(held_set):
            conns = allocation.connections.get(aid)
            plan.accounts[aid] = [dict(c) for c in conns] if conns else []
        return plan
    for aid in sorted(held_set):
        for conn in allocation.connections.get(aid, ()):
            plan.mock.update(conn)
    if holds_mock_pool:
        for token in allocation.unassigned:
            plan.mock[token] = modes.get(token, "full")
    return plan


class ApplyRequests:
    """Requests for an apply; requests made while one runs coalesce into one more.

    The lease loop's callbacks are here: they only ask (an apply can take a second at 100k
    instruments) and never wait on engine work, so renewals keep their rhythm.
    """

    def __init__(self, *, intake: TickIntake, connections: ConnectionManager) -> None:
        self._intake = intake
        self._connections = connections
        self._wanted = asyncio.Event()

    def request(self) -> None:
        self._wanted.set()

    async def next(self) -> None:
        """Wait for a request; it is cleared at once, so requests during the apply count."""
        await self._wanted.wait()
        self._wanted.clear()

    async def lease_acquired(self, account_id: int) -> None:
        self._intake.reset_account(account_id)
        self.request()

    async def lease_lost(self, account_id: int) -> None:
        # Connections first: another process may take the account once the row lapses.
        await self._connections.stop(account_id)
        self.request()

    async def mock_pool(self, _held: bool) -> None:
        self.request()


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """What one reload found, for the engine's log line."""

    subscriptions: int
    allocation: Allocation
    rows_written: int


class StreamPlanner:
    """Owns accounts, modes, allocation and plan; ``reload`` then ``apply_plan`` a mode."""

    def __init__(
        self,
        *,
        connections: ConnectionManager,
        leases: LeaseManager,
        worker: PipelineWorker,
        intake: TickIntake,
        mock_feed: MockFeed,
        supervisor: Supervisor,
        trigger: ReloadTrigger,
        metrics: EngineMetrics,
        account_labels: frozenset[str] | None = None,
    ) -> None:
        self._connections = connections
        self._leases = leases
        self._worker = worker
        self._intake = intake
        self._mock_feed = mock_feed
        self._supervisor = supervisor
        self._trigger = trigger
        self._metrics = metrics
        self._account_labels = account_labels
        self.accounts: dict[int, AccountRow] = {}
        self._modes: dict[int, str] = {}
        self.allocation = Allocation()
        self.plan = StreamPlan()
        self._instrument_rows: dict[int, dict[str, Any]] = {}
        #: Accounts whose token Kite refused -> that token's fingerprint (never logged).
        self.expired: dict[int, str] = {}

    def label(self, account_id: int) -> str:
        account = self.accounts.get(account_id)
        return account.label if account else f"#{account_id}"

    # --- reload -----------------------------------------------------------------------------

    async def reload(self) -> ReloadResult:
        """Load accounts and subscriptions, allocate, write back; the caller applies."""
        world: World = await run_db(world_load)
        self.accounts = {a.account_id: a for a in world.accounts}
        self._intake.labels = {a.account_id: a.label for a in world.accounts}
        self._modes = {s.token: s.mode for s in world.subscriptions}
        # Pure work over up to 100k rows: in a thread, off the loop that reads the ticks.
        allocation = await asyncio.to_thread(
            lambda: allocate(
                subscriptions=[s.wish() for s in world.subscriptions],
                accounts=[a.info() for a in world.accounts],
                previous=self.allocation,
            )
        )
        written = await run_db(
            assignments_save, allocation=allocation, subscriptions=world.subscriptions
        )
        self.allocation = allocation
        for aid, refused in list(self.expired.items()):
            account = self.accounts.get(aid)
            # Only a new token lifts the expiry: a load that ran before the 403 was recorded
            # still says "streamable" with the refused token.
            if account is not None and account.streamable and account.token_fingerprint != refused:
                del self.expired[aid]  # a new login
        self._leases.set_wanted(self._wanted_accounts())
        return ReloadResult(len(world.subscriptions), allocation, written)

    def _wanted_accounts(self) -> set[int]:
        labels = self._account_labels
        return {
            a.account_id
            for a in self.accounts.values()
            if a.streamable and (labels is None or a.label in labels)
        }

    # --- apply ------------------------------------------------------------------------------

    async def apply_plan(self, mode: EngineMode) -> None:
        """Make connections, mock feed and pipeline match the allocation, leases and ``mode``."""
        plan = plan_streams(
            allocation=self.allocation,
            modes=self._modes,
            held=self._leases.held,
            mode=mode,
            holds_mock_pool=self._leases.holds_mock_pool,
        )
        await self._set_universe(plan.tokens())
        # Live: start, update or stop each account's client; untouched tokens keep streaming.
        for aid in list(self._connections.running()):
            if aid not in plan.accounts:
                await self._connections.stop(aid)
        for aid, conns in plan.accounts.items():
            account = self.accounts.get(aid)
            if account is None or not account.streamable or aid in self.expired:
                await self._connections.stop(aid)
                continue
            # The lease is checked right before the start, with no await in between: a
            # lease lost while this apply waited on the database is never restarted.
            if not self._leases.holds(aid):
                continue
            self._connections.start(
                account, on_ticks=self._intake.live_ticks, on_session_expired=self.session_expired
            )
            wanted: dict[int, str] = {}
            for conn in conns:
                wanted.update(conn)
            await self._connections.update(account, wanted)
        self._mock_feed.set_tokens(plan.mock)
        self.plan = plan
        for aid in plan.accounts:
            self._metrics.instruments.labels(self.label(aid)).set(
                sum(len(c) for c in plan.accounts[aid])
            )
        self._metrics.instruments.labels("mock").set(len(plan.mock))
        self._metrics.leases_held.set(len(self._leases.held))

    def clear(self) -> None:
        """Nothing is streamed any more (shutdown)."""
        self.plan = StreamPlan()

    async def _set_universe(self, tokens: set[int]) -> None:
        current = self._worker.universe
        if len(current) == len(tokens) and set(current.tokens.tolist()) == tokens:
            return
        missing = [t for t in tokens if t not in self._instrument_rows]
        if missing:
            for row in await run_db(instruments_load, tokens=missing):
                self._instrument_rows[row["instrument_token"]] = row
        rows = [self._instrument_rows[t] for t in tokens if t in self._instrument_rows]
        # Building 100k instruments' arrays and JSON prefixes takes about a second of pure
        # work: done in a thread so the loop keeps reading ticks and renewing leases.
        universe = await asyncio.to_thread(InstrumentUniverse.from_rows, rows)
        await self._worker.install(universe)
        # Rows of instruments we no longer stream are not kept: the cache tracks the universe.
        self._instrument_rows = {t: self._instrument_rows[t] for t in tokens
                                 if t in self._instrument_rows}

    # --- session expiry -----------------------------------------------------------------------

    def session_expired(self, account_id: int, reason: str) -> None:
        """Kite refused the token (403): record it, release the account, reallocate."""
        label = self.label(account_id)
        log.warning("engine.session_expired", account=label, reason=reason)
        in_use = self._connections.token_in_use(account_id)
        if in_use is None:
            account = self.accounts.get(account_id)
            if account is None:
                return
            in_use = (account.token_fingerprint, account.token_issued_at)
        fingerprint, issued_at = in_use
        self.expired[account_id] = fingerprint
        name = f"expire:{label}"
        if not self._supervisor.is_running(name):
            self._supervisor.spawn(
                name, lambda: self._expire(account_id, reason, issued_at),
                owner=f"account:{label}", restart=False,
            )

    async def _expire(self, account_id: int, reason: str, issued_at: dt.datetime | None) -> None:
        await self._connections.stop(account_id)
        await run_db(account_expire_session, account_id=account_id, reason=reason,
                     token_issued_at=issued_at)
        self._trigger.notify()

    # --- status -------------------------------------------------------------------------------

    def account_statuses(self, *, mode: EngineMode, since_last_s: float) -> dict[str, AccountStatus]:
        """Per held (or refused) account: its state and tick flow since the last status."""
        now = time.monotonic()
        out: dict[str, AccountStatus] = {}
        conn_states = self._connections.states()
        for aid in sorted(self._leases.held | set(self.expired)):
            account = self.accounts.get(aid)
            stats = self._intake.accounts.setdefault(aid, AccountTicks())
            stats.rate_per_s = (stats.ticks - stats.ticks_at_last_beat) / since_last_s
            stats.ticks_at_last_beat = stats.ticks
            conn = conn_states.get(aid, {})
            if "reconnects" in conn:
                self._metrics.reconnects.labels(self.label(aid)).set(conn["reconnects"])
                self._metrics.malformed.labels(self.label(aid)).set(conn["malformed"])
            expired = aid in self.expired
            if expired:
                state = "session_expired"
            elif mode == "mock":
                state = "stopped"
            else:
                state = conn.get("state", "connecting")
            out[self.label(aid)] = AccountStatus(
                account_id=aid,
                state=state,
                connections=conn.get("connections", 0),
                instruments=sum(len(c) for c in self.plan.accounts.get(aid, ())),
                ticks_per_s=round(stats.rate_per_s, 1),
                last_tick_age_s=(
                    None
                    if stats.last_tick_monotonic is None
                    else round(now - stats.last_tick_monotonic, 1)
                ),
                reconnects=conn.get("reconnects", 0),
                session="expired" if expired or (account and not account.streamable) else "ok",
            )
        return out
