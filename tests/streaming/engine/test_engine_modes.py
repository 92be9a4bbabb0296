"""The running engine: live and mock never mix across the market open/close, a new login
reaches the Kite client without a restart, --accounts restricts what a process streams, a
re-login after expiry resumes streaming, and closed underlying bars are stored and published.
"""

import asyncio
import datetime as dt
import time

import orjson
import pytest

from accounts.models import KiteAccount
from accounts.services import account_set_session
from streaming import schema
from streaming.control import notify_engines_on_commit
from streaming.engine.store import run_db
from streaming.market import SyntheticMarket
from streaming.models import UnderlyingBar
from tests.helpers import async_wait_until, epoch_at_ist, next_trading_day
from tests.streaming.engine.runtime_helpers import (
    InProcessEngine,
    instruments_from_market,
    make_account,
    subscribe,
)

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def world(transactional_db):
    market = SyntheticMarket(seed=0)
    instruments_from_market(market)
    expiry = min(r["expiry"] for r in market.instruments
                 if r["name"] == "NIFTY" and r["instrument_type"] == "CE")
    nifty = sorted(r["instrument_token"] for r in market.instruments
                   if r["name"] == "NIFTY" and (r["expiry"] == expiry or r["expiry"] is None
                                                or r["instrument_type"] == "FUT"))
    nifty.append(market.index_token("NIFTY"))
    subscribe(sorted(set(nifty)))
    account = make_account("acc1", api_key="k1", access_token="tok-acc1")
    return {"market": market, "tokens": sorted(set(nifty)), "expiry": expiry,
            "account": account, "group": schema.chain_group("NIFTY", expiry)}


async def test_live_at_the_open_mock_after_the_close_never_mixed(world):
    """The engine's clock runs in a trading day; crossing 15:30 IST switches it to mock."""
    day = next_trading_day(dt.date.today())
    offset = [epoch_at_ist(day, 15, 29) + 50 - time.time()]  # 10 s before the close

    def clock():
        return time.time() + offset[0]

    async with InProcessEngine(accounts={"acc1": "k1"}, force_mode=None, clock=clock,
                               mode_check_interval_s=0.2, mock_interval_ms=100) as h:
        listener = await h.listen(world["group"])
        assert h.engine.mode == "live"
        await async_wait_until(lambda: h.sim.connection_count("k1") == 1, timeout_s=60,
                               what="live connection")
        await listener.until(lambda: len(listener.latest) > 20, timeout_s=60,
                             what="live snapshots")
        assert {s["is_mock"] for s in listener.latest.values()} == {False}

        offset[0] += 20  # past 15:30 IST
        await async_wait_until(lambda: h.engine.mode == "mock", timeout_s=60, what="mock mode")
        await async_wait_until(lambda: h.sim.connection_count("k1") == 0, timeout_s=60,
                               what="Kite connections closed after the close")
        # Everything now comes from the mock market, and every snapshot says so.
        await listener.drain(0.5)  # what was in flight at the switch
        listener.latest.clear()
        await listener.until(lambda: len(listener.latest) > 20, timeout_s=60,
                             what="mock snapshots")
        assert {s["is_mock"] for s in listener.latest.values()} == {True}
        assert h.engine.status().mode == "mock"
        assert h.engine.status().accounts["acc1"].state == "stopped"

        offset[0] = epoch_at_ist(next_trading_day(day), 9, 16) - time.time()  # the next open
        await async_wait_until(lambda: h.engine.mode == "live", timeout_s=60, what="live again")
        await async_wait_until(lambda: h.sim.connection_count("k1") == 1, timeout_s=60,
                               what="reconnected at the open")
        await listener.drain(0.5)
        listener.latest.clear()
        await listener.until(lambda: len(listener.latest) > 20, timeout_s=60,
                             what="live snapshots again")
        assert {s["is_mock"] for s in listener.latest.values()} == {False}


async def test_a_failed_switch_to_mock_is_retried_until_the_mock_feed_runs(world):
    """An apply failing during the switch leaves the old mode in place, so the restarted mode
    loop switches again instead of believing it is already in mock mode with no feed."""
    day = next_trading_day(dt.date.today())
    offset = [epoch_at_ist(day, 15, 29) + 50 - time.time()]  # 10 s before the close

    def clock():
        return time.time() + offset[0]

    async with InProcessEngine(accounts={"acc1": "k1"}, force_mode=None, clock=clock,
                               mode_check_interval_s=0.2, mock_interval_ms=100) as h:
        assert h.engine.mode == "live"
        await async_wait_until(lambda: h.sim.connection_count("k1") == 1, timeout_s=60,
                               what="live connection")
        set_tokens = h.engine.mock_feed.set_tokens
        failures = []

        def set_tokens_failing_once(tokens):
            if not failures:
                failures.append(tokens)
                raise RuntimeError("injected: mock feed refused its tokens")
            set_tokens(tokens)

        h.engine.mock_feed.set_tokens = set_tokens_failing_once
        offset[0] += 20  # past 15:30 IST
        await async_wait_until(
            lambda: h.engine.mode == "mock" and h.engine.supervisor.is_running("mock_feed"),
            timeout_s=60, what="mock mode with its feed running",
        )
        assert failures, "the injected failure never happened"
        assert h.engine.supervisor.state("mode").restarts >= 1
        assert h.sim.connection_count("k1") == 0
        listener = await h.listen(world["group"])
        await listener.until(lambda: len(listener.latest) > 20, timeout_s=60,
                             what="mock snapshots")
        assert {s["is_mock"] for s in listener.latest.values()} == {True}


async def test_a_failed_apply_is_applied_again(world):
    """The applier's request survives an apply that raises: the restarted loop applies it."""
    async with InProcessEngine(accounts={"acc1": "k1"}) as h:
        await async_wait_until(lambda: h.sim.connection_count("k1") == 1, timeout_s=60,
                               what="streaming")
        set_tokens = h.engine.mock_feed.set_tokens
        calls = []

        def set_tokens_failing_once(tokens):
            # Which run of the applier task made this apply.
            calls.append(h.engine.supervisor.state("applier").restarts)
            if len(calls) == 1:
                raise RuntimeError("injected: mock feed refused its tokens")
            set_tokens(tokens)

        h.engine.mock_feed.set_tokens = set_tokens_failing_once
        h.engine.applies.request()
        # Well before the safety reload (60 s), which would apply anyway.
        await async_wait_until(lambda: any(run >= 1 for run in calls), timeout_s=60,
                               what="the restarted applier applying the request again")
        assert calls[0] == 0


async def test_a_new_login_reaches_the_running_client(world):
    async with InProcessEngine(accounts={"acc1": "k1"}) as h:
        await async_wait_until(lambda: h.sim.connection_count("k1") == 1, timeout_s=60,
                               what="connected with the first token")
        first = {c.id for c in h.sim.connections("k1")}
        # The morning login: Kite now accepts only the new token.
        h.sim.set_access_token("k1", "tok-new")

        def login():
            account = KiteAccount.objects.get(label="acc1")
            account_set_session(account=account, access_token="tok-new")
            notify_engines_on_commit()

        await run_db(login)
        # The socket is untouched by the token change...
        await asyncio.sleep(1.0)
        assert {c.id for c in h.sim.connections("k1")} == first
        # ...and when it drops, the reconnect uses the new token (the old one is refused).
        await h.sim.drop_connections("k1")
        await async_wait_until(
            lambda: h.sim.connection_count("k1") == 1
            and {c.id for c in h.sim.connections("k1")} != first,
            timeout_s=60, what="reconnected with the new token",
        )
        assert h.engine.status().accounts["acc1"].session == "ok"


async def test_accounts_option_restricts_what_this_process_streams(world):
    await run_db(lambda: make_account("acc2", api_key="k2", access_token="tok-acc2"))
    async with InProcessEngine(accounts={"acc1": "k1", "acc2": "k2"},
                               account_labels=frozenset({"acc2"})) as h:
        await async_wait_until(lambda: h.sim.connection_count("k2") == 1, timeout_s=60,
                               what="acc2 streaming")
        # The allocation is global (acc1 gets its share), but this process only holds acc2.
        await asyncio.sleep(1.0)
        assert h.sim.connection_count("k1") == 0
        assert set(h.engine.status().accounts) == {"acc2"}


async def test_relogin_after_expiry_resumes_streaming(world):
    async with InProcessEngine(accounts={"acc1": "k1"}) as h:
        await async_wait_until(lambda: h.sim.connection_count("k1") == 1, timeout_s=60,
                               what="streaming")
        h.sim.expire_token("k1")
        await async_wait_until(
            lambda: getattr(h.engine.status().accounts.get("acc1"), "state", None)
            == "session_expired",
            timeout_s=60, what="session expired seen",
        )
        h.sim.set_access_token("k1", "tok-morning")

        def login():
            account = KiteAccount.objects.get(label="acc1")
            account_set_session(account=account, access_token="tok-morning")
            notify_engines_on_commit()

        await run_db(login)
        await async_wait_until(lambda: h.sim.connection_count("k1") == 1, timeout_s=60,
                               what="streaming again after the login")
        await async_wait_until(
            lambda: h.engine.status().accounts["acc1"].state == "streaming",
            timeout_s=60, what="heartbeat streaming",
        )


async def test_a_reload_that_still_sees_the_refused_token_does_not_restart_the_client(world):
    """The database may say "active" with the refused token (a load before the expiry was
    written, or another engine's view): only a new token lifts the expiry."""
    account_id = world["account"].pk
    async with InProcessEngine(accounts={"acc1": "k1"}) as h:
        await async_wait_until(lambda: h.sim.connection_count("k1") == 1, timeout_s=60,
                               what="streaming")
        h.sim.expire_token("k1")
        sup = h.engine.supervisor
        await async_wait_until(
            lambda: sup.state("expire:acc1") is not None and not sup.is_running("expire:acc1"),
            timeout_s=60, what="the expiry recorded",
        )
        assert sup.state("expire:acc1").state == "finished"
        assert account_id not in h.engine.connections.running()
        status = await run_db(lambda: KiteAccount.objects.get(pk=account_id).status)
        assert status == KiteAccount.Status.SESSION_EXPIRED
        # As a load taken before that write saw it: active, with the same token.
        await run_db(lambda: KiteAccount.objects.filter(pk=account_id).update(
            status=KiteAccount.Status.ACTIVE, last_error=""))
        await h.engine.reload("test")
        assert account_id not in h.engine.connections.running()
        assert h.engine.status().accounts["acc1"].state == "session_expired"


async def test_closed_underlying_bars_are_stored_and_published(world):
    market: SyntheticMarket = world["market"]
    index = market.index_token("NIFTY")
    async with InProcessEngine(accounts={}, force_mode="mock", mock_interval_ms=60_000) as h:
        listener = await h.listen(schema.bars_group("NIFTY"))
        await async_wait_until(lambda: index in set(h.engine.worker.universe.tokens.tolist()),
                               timeout_s=60, what="the index in the engine's universe")
        # Ticks of two minutes of exchange time (ahead of the mock feed's own tick, so none
        # is late): the second minute's tick closes the first minute's bar.
        minute = (int(time.time()) // 60 + 2) * 60
        ticks = market.ticks([index, index, index], mode="full")
        ticks["exchange_timestamp"] = [minute + 5, minute + 30, minute + 65]
        ticks["last_price"] = [26000.0, 26010.0, 26020.0]
        h.engine.intake.mock_ticks(ticks)

        messages = []

        async def receive():
            while True:
                messages.append(await h.layer.receive(listener.channel))

        task = asyncio.create_task(receive())
        try:
            await async_wait_until(
                lambda: any(orjson.loads(m["item"])["start_ts"] == minute * 1000
                            for m in messages),
                timeout_s=60, what="bar.closed message for the minute",
            )
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert {m["type"] for m in messages} == {"bar.closed"}

        def stored():
            return UnderlyingBar.objects.filter(
                instrument_id=index, start=dt.datetime.fromtimestamp(minute, dt.UTC)
            ).first()

        bar = await run_db(stored)
        deadline = time.monotonic() + 5
        while bar is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            bar = await run_db(stored)
        assert bar is not None
        assert (bar.open, bar.high, bar.low, bar.close) == (26000.0, 26010.0, 26000.0, 26010.0)
        assert bar.tick_count == 2
        assert bar.is_mock is True
        assert bar.is_gap is False


async def test_malformed_kite_frames_are_counted_in_the_metrics_and_streaming_goes_on(world):
    """Broken frames are skipped and counted (tickerproj_engine_kite_malformed_parts), never
    raised: the client keeps its socket, and ticks keep coming."""
    async with InProcessEngine(accounts={"acc1": "k1"}) as h:
        listener = await h.listen(world["group"])
        await async_wait_until(lambda: h.sim.connection_count("k1") == 1, timeout_s=60,
                               what="live connection")
        kinds = ("truncated", "unknown_length", "count_exceeds", "text")
        for kind in kinds:
            assert h.sim.send_malformed("k1", kind=kind) == 1

        def counted() -> float:
            h.engine.status()  # what the heartbeat calls: it sets the per-account gauges
            value = h.engine.metrics.registry.get_sample_value(
                "tickerproj_engine_kite_malformed_parts", {"account": "acc1"}
            )
            return value or 0.0

        await async_wait_until(lambda: counted() >= len(kinds), timeout_s=60,
                               what="malformed parts counted")
        assert h.engine.status().accounts["acc1"].reconnects == 0
        assert h.engine.supervisor.state("kite:acc1").restarts == 0
        await listener.drain(0.5)
        listener.latest.clear()
        await listener.until(lambda: len(listener.latest) > 20, timeout_s=60,
                             what="snapshots after the broken frames")
