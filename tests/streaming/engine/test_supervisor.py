"""The supervisor: crashes are logged with context, counted, shown in state and restarted with
backoff; shutdown cancels and awaits every task."""

import asyncio
import itertools
import logging
import time

import pytest

from streaming.engine.connections import default_client_factory
from streaming.engine.store import run_db
from streaming.engine.supervisor import Supervisor
from streaming.health import HealthContext, health_report
from streaming.market import SyntheticMarket
from tests.helpers import async_wait_until
from tests.streaming.engine.runtime_helpers import (
    InProcessEngine,
    instruments_from_market,
    make_account,
    subscribe,
)


def event_records(caplog, event):
    return [r for r in caplog.records if isinstance(r.msg, dict) and r.msg.get("event") == event]


async def test_crashed_task_is_logged_counted_and_restarted(caplog):
    crashes = []
    sup = Supervisor(
        on_crash=lambda name, owner, exc: crashes.append((name, owner, type(exc))),
        backoff_initial_s=0.01,
    )
    starts = []
    release = asyncio.Event()

    async def flaky():
        starts.append(time.monotonic())
        if len(starts) <= 2:
            raise ValueError(f"boom {len(starts)}")
        await release.wait()

    caplog.set_level(logging.INFO)
    sup.spawn("flaky", flaky, owner="account:acc1")
    await async_wait_until(lambda: len(starts) == 3)
    await async_wait_until(lambda: sup.states()["flaky"]["state"] == "running")
    state = sup.states()["flaky"]
    assert state["restarts"] == 2
    assert state["owner"] == "account:acc1"
    assert state["last_error"] == "ValueError: boom 2"
    assert state["last_crash_age_s"] is not None
    assert crashes == [("flaky", "account:acc1", ValueError)] * 2

    crashed = event_records(caplog, "engine.task_crashed")
    assert len(crashed) == 2
    assert crashed[0].msg["task"] == "flaky"
    assert crashed[0].msg["owner"] == "account:acc1"
    assert crashed[0].levelno == logging.ERROR
    # The traceback as redacted text, never the raw exception (its text may hold a token).
    assert "exc_info" not in crashed[0].msg
    assert crashed[0].msg["error"] == "ValueError: boom 1"
    assert "ValueError: boom 1" in crashed[0].msg["traceback"]

    release.set()
    await async_wait_until(lambda: sup.states()["flaky"]["state"] == "finished")
    await sup.shutdown()


async def test_a_failing_on_crash_hook_does_not_stop_the_restarts(caplog):
    def hook(name, owner, exc):
        raise KeyError("metrics label")

    sup = Supervisor(on_crash=hook, backoff_initial_s=0.01)
    starts = []
    release = asyncio.Event()

    async def flaky():
        starts.append(1)
        if len(starts) == 1:
            raise ValueError("boom")
        await release.wait()

    caplog.set_level(logging.INFO)
    sup.spawn("flaky", flaky, owner="engine")
    await async_wait_until(lambda: len(starts) == 2)
    assert sup.states()["flaky"]["restarts"] == 1
    assert event_records(caplog, "engine.on_crash_failed")
    await sup.shutdown()


async def test_an_access_token_in_the_error_text_is_not_kept():
    sup = Supervisor(backoff_initial_s=0.01)
    token = "a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6"

    async def fails():
        raise OSError(f"cannot reach wss://ws.kite.trade?api_key=k1&access_token={token}")

    sup.spawn("kite:acc1", fails, owner="account:acc1", restart=False)
    await async_wait_until(lambda: sup.states()["kite:acc1"]["state"] == "failed")
    error = sup.states()["kite:acc1"]["last_error"]
    assert token not in error
    assert error == "OSError: cannot reach wss://ws.kite.trade?api_key=k1&access_token=***"
    await sup.shutdown()


async def test_restart_delays_grow():
    sup = Supervisor(backoff_initial_s=0.05)
    starts = []

    async def always_fails():
        starts.append(time.monotonic())
        raise RuntimeError("no")

    sup.spawn("bad", always_fails, owner="test")
    await async_wait_until(lambda: len(starts) >= 4)
    await sup.shutdown()
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # Exponential: 0.05-0.10, 0.10-0.15, 0.20-0.25 s.
    assert gaps[0] >= 0.05
    assert gaps[2] > gaps[0] + 0.05
    assert sup.states()["bad"]["state"] == "stopped"


async def test_state_shows_restarting_while_backing_off():
    sup = Supervisor(backoff_initial_s=5.0)

    async def fails():
        raise OSError("socket gone")

    sup.spawn("t", fails, owner="o")
    await async_wait_until(lambda: sup.states()["t"]["state"] == "restarting")
    assert sup.states()["t"]["last_error"] == "OSError: socket gone"
    await sup.shutdown()


async def test_task_without_restart_is_failed():
    sup = Supervisor(backoff_initial_s=0.01)

    async def fails_once():
        raise KeyError("x")

    sup.spawn("once", fails_once, owner="o", restart=False)
    await async_wait_until(lambda: sup.states()["once"]["state"] == "failed")
    assert sup.states()["once"]["restarts"] == 0
    await sup.shutdown()


async def test_shutdown_cancels_and_awaits_every_task():
    sup = Supervisor()
    cleaned = []

    def forever(name):
        async def run():
            try:
                await asyncio.Event().wait()
            finally:
                cleaned.append(name)

        return run

    for i in range(5):
        sup.spawn(f"t{i}", forever(f"t{i}"), owner="o")
    await asyncio.sleep(0)
    await sup.shutdown()
    assert sorted(cleaned) == [f"t{i}" for i in range(5)]
    assert not any(sup.is_running(f"t{i}") for i in range(5))
    with pytest.raises(RuntimeError):
        sup.spawn("late", forever("late"), owner="o")


async def test_stop_owner_stops_only_that_owners_tasks():
    sup = Supervisor()

    async def forever():
        await asyncio.Event().wait()

    sup.spawn("a.stream", forever, owner="account:a")
    sup.spawn("a.other", forever, owner="account:a")
    sup.spawn("b.stream", forever, owner="account:b")
    await sup.stop_owner("account:a")
    assert not sup.is_running("a.stream")
    assert not sup.is_running("a.other")
    assert sup.is_running("b.stream")
    assert sup.names() == ["b.stream"]
    await sup.shutdown()


async def test_spawning_a_running_name_twice_is_refused():
    sup = Supervisor()

    async def forever():
        await asyncio.Event().wait()

    sup.spawn("x", forever, owner="o")
    with pytest.raises(RuntimeError, match="already running"):
        sup.spawn("x", forever, owner="o")
    await sup.shutdown()


# --- a crash inside the running engine -------------------------------------------------------


@pytest.fixture
def one_account_world(transactional_db):
    market = SyntheticMarket(seed=0)
    instruments_from_market(market)
    subscribe(sorted(r["instrument_token"] for r in market.instruments)[:50])
    make_account("acc1", api_key="k1", access_token="tok-acc1")


def crash_on_third_frame(**kwargs):
    """The real Kite client, whose tick handling raises once (a bug in a callback, say)."""
    frames = {"n": 0}
    on_ticks = kwargs["on_ticks"]

    def flaky(ticks):
        frames["n"] += 1
        if frames["n"] == 3:
            raise ValueError("injected fault in tick handling")
        on_ticks(ticks)

    return default_client_factory(**{**kwargs, "on_ticks": flaky})


@pytest.mark.django_db(transaction=True)
async def test_a_crashed_engine_task_is_restarted_reported_in_health_and_heals(one_account_world):
    async with InProcessEngine(accounts={"acc1": "k1"}, client_factory=crash_on_third_frame) as h:
        sup = h.engine.supervisor
        await async_wait_until(
            lambda: (st := sup.state("kite:acc1")) is not None and st.restarts == 1
            and st.state == "running",
            timeout_s=20, what="kite:acc1 restarted",
        )
        # It streams again: a new socket, ticks flowing.
        await async_wait_until(lambda: h.sim.connection_count("k1") == 1, timeout_s=10,
                               what="reconnected")
        ticks_before = h.sim.ticks_sent_to("k1")
        await async_wait_until(lambda: h.sim.ticks_sent_to("k1") > ticks_before + 100,
                               timeout_s=10, what="ticks after the restart")

        state = h.engine.status().tasks["kite:acc1"]
        assert state.restarts == 1
        assert state.last_error == "ValueError: injected fault in tick handling"
        assert h.engine.metrics.task_crashes.labels("kite:acc1")._value.get() == 1

        assert await h.engine.heartbeat.write_once(h.engine.status())

        def report(max_age_s):
            return health_report(
                HealthContext(redis_url="", heartbeat_max_age_s=max_age_s, stream_stall_s=30)
            )

        body = await run_db(report, max_age_s=3.0)
        assert body["status"] == "degraded"
        assert [(r["code"], r["task"]) for r in body["reasons"]] == [("task_failed", "kite:acc1")]
        # Healed: once the crash is older than the window, health is green again.
        await asyncio.sleep(3.0)
        assert await h.engine.heartbeat.write_once(h.engine.status())
        body = await run_db(report, max_age_s=3.0)
        assert body["reasons"] == []


async def test_a_task_that_loses_a_cancellation_is_still_stopped():
    """Python 3.11's wait_for drops a cancel that lands as its inner wait completes; the
    supervisor cancels again until the task has ended (the lease loop hung shutdown so)."""
    sup = Supervisor(on_crash=lambda name, owner, exc: None, backoff_initial_s=0.01)
    cancels = []

    async def swallows_the_first_cancel():
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancels.append(time.monotonic())
                if len(cancels) > 1:
                    raise
                # what a lost cancellation looks like from inside the loop: it goes on

    sup.spawn("stubborn", swallows_the_first_cancel, owner="engine")
    await async_wait_until(lambda: sup.is_running("stubborn"))
    await asyncio.wait_for(sup.stop("stubborn"), timeout=30)
    assert len(cancels) == 2
    assert not sup.is_running("stubborn")
