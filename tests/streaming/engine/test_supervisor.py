"""The supervisor: crashes are logged with context, counted, shown in state and restarted with
backoff; shutdown cancels and awaits every task."""

import asyncio
import itertools
import logging
import time

import pytest

from streaming.engine.supervisor import Supervisor


async def wait_for(predicate, *, timeout_s=5.0, interval_s=0.01):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(interval_s)


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
    await wait_for(lambda: len(starts) == 3)
    await wait_for(lambda: sup.states()["flaky"]["state"] == "running")
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
    assert isinstance(crashed[0].msg["exc_info"], ValueError)  # rendered as a traceback

    release.set()
    await wait_for(lambda: sup.states()["flaky"]["state"] == "finished")
    await sup.shutdown()


async def test_restart_delays_grow():
    sup = Supervisor(backoff_initial_s=0.05)
    starts = []

    async def always_fails():
        starts.append(time.monotonic())
        raise RuntimeError("no")

    sup.spawn("bad", always_fails, owner="test")
    await wait_for(lambda: len(starts) >= 4)
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
    await wait_for(lambda: sup.states()["t"]["state"] == "restarting")
    assert sup.states()["t"]["last_error"] == "OSError: socket gone"
    await sup.shutdown()


async def test_task_without_restart_is_failed():
    sup = Supervisor(backoff_initial_s=0.01)

    async def fails_once():
        raise KeyError("x")

    sup.spawn("once", fails_once, owner="o", restart=False)
    await wait_for(lambda: sup.states()["once"]["state"] == "failed")
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
