"""Live changes: notices coalesce into one reload, Redis and in-process notices both arrive,
and the diff sends only what changed."""

import asyncio
import contextlib
import threading
import time

from django.conf import settings

from streaming.control import CONTROL_CHANNEL, ChangeNotifier
from streaming.engine.reloader import (
    LocalNoticeListener,
    RedisNoticeListener,
    Reloader,
    ReloadTrigger,
    diff_subscriptions,
)


async def wait_for(predicate, *, timeout_s=5.0, interval_s=0.01):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(interval_s)


class CountingReload:
    def __init__(self, delay_s=0.0):
        self.calls = []
        self.delay_s = delay_s

    async def __call__(self, reason):
        self.calls.append(reason)
        await asyncio.sleep(self.delay_s)


async def run_reloader(trigger, reload):
    task = asyncio.create_task(Reloader(trigger=trigger, reload=reload).run())
    await asyncio.sleep(0)
    return task


async def stop(*tasks):
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_burst_of_1000_notices_causes_one_reload():
    trigger = ReloadTrigger(debounce_s=0.2, max_delay_s=1.0, safety_interval_s=60)
    reload = CountingReload()
    task = await run_reloader(trigger, reload)
    try:
        for _ in range(1000):
            trigger.notify()
            if _ % 100 == 0:
                await asyncio.sleep(0.01)  # spread over ~0.1 s, as a bulk edit would
        await wait_for(lambda: reload.calls == ["start", "notice"])
        await asyncio.sleep(0.5)
        assert reload.calls == ["start", "notice"]
        assert trigger.notices == 1000
    finally:
        await stop(task)


async def test_continuous_notices_still_reload_within_the_max_delay():
    trigger = ReloadTrigger(debounce_s=0.2, max_delay_s=0.6, safety_interval_s=60)
    reload = CountingReload()
    task = await run_reloader(trigger, reload)
    try:
        await wait_for(lambda: reload.calls == ["start"])
        started = time.monotonic()
        while len(reload.calls) < 2:
            trigger.notify()  # every 50 ms: never quiet for 200 ms
            await asyncio.sleep(0.05)
            assert time.monotonic() - started < 2.0
        assert time.monotonic() - started < 1.0
    finally:
        await stop(task)


async def test_notices_during_a_reload_cause_exactly_one_more():
    trigger = ReloadTrigger(debounce_s=0.05, max_delay_s=0.2, safety_interval_s=60)
    reload = CountingReload(delay_s=0.5)
    task = await run_reloader(trigger, reload)
    try:
        await wait_for(lambda: len(reload.calls) == 1)  # the start reload, running 0.5 s
        for _ in range(50):  # all while it runs
            trigger.notify()
        await wait_for(lambda: len(reload.calls) == 2)
        await asyncio.sleep(1.0)
        assert reload.calls == ["start", "notice"]
    finally:
        await stop(task)


async def test_periodic_safety_reload_without_notices():
    trigger = ReloadTrigger(debounce_s=0.05, safety_interval_s=0.2)
    reload = CountingReload()
    task = await run_reloader(trigger, reload)
    try:
        await wait_for(lambda: len(reload.calls) >= 3)
        assert reload.calls[0] == "start"
        assert set(reload.calls[1:]) == {"periodic"}
    finally:
        await stop(task)


async def test_redis_notices_reach_the_trigger(redis_client):
    trigger = ReloadTrigger(debounce_s=0.05, safety_interval_s=60)
    listener = RedisNoticeListener(redis_url=settings.REDIS_URL, trigger=trigger)
    task = asyncio.create_task(listener.run())
    try:
        await asyncio.wait_for(listener.subscribed.wait(), timeout=5)
        # Subscribing counts as a notice: changes while we were away must not be lost.
        await wait_for(lambda: trigger.notices >= 1)
        # Pub/sub channels are not scoped by Redis db number, so another suite running at the
        # same time may add notices: count ours as "at least".
        before = trigger.notices
        notifier = ChangeNotifier(redis_url=settings.REDIS_URL)
        for _ in range(3):
            await asyncio.to_thread(notifier.notify)
        await wait_for(lambda: trigger.notices >= before + 3)
        assert redis_client.pubsub_numsub(CONTROL_CHANNEL)[0][1] >= 1
    finally:
        await stop(task)


async def test_in_process_notices_from_another_thread_reach_the_trigger():
    trigger = ReloadTrigger(debounce_s=0.05, safety_interval_s=60)
    trigger.bind_loop(asyncio.get_running_loop())
    notifier = ChangeNotifier(redis_url="")
    task = asyncio.create_task(LocalNoticeListener(notifier=notifier, trigger=trigger).run())
    await asyncio.sleep(0)
    try:
        thread = threading.Thread(target=notifier.notify)
        thread.start()
        thread.join()
        await wait_for(lambda: trigger.notices == 1)
    finally:
        await stop(task)
    # Unregistered when the listener stops.
    notifier.notify()
    await asyncio.sleep(0.05)
    assert trigger.notices == 1


async def test_a_crashed_reloader_reloads_at_once_when_restarted():
    trigger = ReloadTrigger(debounce_s=0.05, safety_interval_s=60)
    calls = []

    async def reload(reason):
        calls.append(reason)
        if len(calls) == 1:
            raise ConnectionError("database away")

    reloader = Reloader(trigger=trigger, reload=reload)
    with contextlib.suppress(ConnectionError):
        await reloader.run()
    task = asyncio.create_task(reloader.run())  # what the supervisor does after a crash
    try:
        await wait_for(lambda: calls == ["start", "start"])
        assert reloader.reloads == 1
    finally:
        await stop(task)


def test_diff_sends_only_changes():
    old = {1: "full", 2: "full", 3: "quote"}
    new = {1: "full", 3: "ltp", 4: "full"}
    diff = diff_subscriptions(old, new)
    assert diff.subscribe == {4: "full"}
    assert diff.unsubscribe == [2]
    assert diff.mode_changes == {3: "ltp"}
    assert diff_subscriptions(new, new).empty
