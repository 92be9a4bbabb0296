"""Live changes: change notices in, one coalesced reload out, applied as an incremental diff.

Notices come from Redis pub/sub (``streaming.control.control_channel``) or, on embedded
defaults, from the in-process ``ChangeNotifier``. :class:`ReloadTrigger` holds at most one
pending reload: a burst of notices inside the debounce window (or up to ``max_delay_s`` of
continuous notices) becomes one reload, and nothing ever queues without bound. A periodic
safety reload catches a notice lost while Redis was away.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import structlog

from streaming.control import ChangeNotifier
from tickerproj.redis_connection import async_redis_client

log = structlog.get_logger(__name__)


class ReloadTrigger:
    """A coalescing latch: ``notify()`` any number of times, ``wait()`` returns once per burst."""

    def __init__(
        self,
        *,
        debounce_s: float = 0.2,
        max_delay_s: float = 1.0,
        safety_interval_s: float = 60.0,
    ) -> None:
        self.debounce_s = debounce_s
        self.max_delay_s = max_delay_s
        self.safety_interval_s = safety_interval_s
        self._event = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_notice_monotonic = 0.0
        self.notices = 0

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def notify(self) -> None:
        """Ask for a reload (call on the engine's loop)."""
        self.notices += 1
        self._last_notice_monotonic = time.monotonic()
        self._event.set()

    def notify_threadsafe(self) -> None:
        """Ask for a reload from any thread (the in-process notifier calls from web threads)."""
        if self._loop is None:
            raise RuntimeError("ReloadTrigger.bind_loop() was not called")
        with contextlib.suppress(RuntimeError):  # the loop closed: the engine is gone
            self._loop.call_soon_threadsafe(self.notify)

    async def wait(self) -> str:
        """Return "notice" after a burst has settled, or "periodic" after the safety interval."""
        try:
            await asyncio.wait_for(self._event.wait(), timeout=self.safety_interval_s)
        except TimeoutError:
            return "periodic"
        first = time.monotonic()
        # Trailing-edge debounce: wait until notices stop for debounce_s, but never longer
        # than max_delay_s after the first, so a change still lands well within 2 s.
        while True:
            now = time.monotonic()
            quiet_until = self._last_notice_monotonic + self.debounce_s
            deadline = min(quiet_until, first + self.max_delay_s)
            if now >= deadline:
                break
            await asyncio.sleep(deadline - now)
        self._event.clear()
        return "notice"


class Reloader:
    """The supervised loop that turns triggers into reloads, one at a time."""

    def __init__(
        self,
        *,
        trigger: ReloadTrigger,
        reload: Callable[[str], Awaitable[None]],
    ) -> None:
        self._trigger = trigger
        self._reload = reload
        self.reloads = 0

    async def run(self) -> None:
        """Reload at once (on start and after a crash), then once per trigger."""
        reason = "start" if self.reloads == 0 else "restart"
        while True:
            await self._reload(reason)
            self.reloads += 1
            reason = await self._trigger.wait()


class RedisNoticeListener:
    """Subscribes to the control channel; every message (and every reconnect) is a notice."""

    def __init__(
        self,
        *,
        redis_url: str,
        channel: str,
        trigger: ReloadTrigger,
        health_check_interval_s: int = 10,
    ) -> None:
        self._redis_url = redis_url
        self._channel = channel
        self._trigger = trigger
        self._health_check_interval_s = health_check_interval_s
        self.subscribed = asyncio.Event()

    async def run(self) -> None:
        client = async_redis_client(
            self._redis_url, health_check_interval=self._health_check_interval_s
        )
        try:
            async with client.pubsub(ignore_subscribe_messages=True) as pubsub:
                await pubsub.subscribe(self._channel)
                self.subscribed.set()
                log.info("reload.listening", channel=self._channel)
                # Notices may have been lost while we were not subscribed.
                self._trigger.notify()
                while True:
                    message = await pubsub.get_message(timeout=self._health_check_interval_s)
                    if message is not None and message.get("type") == "message":
                        self._trigger.notify()
        finally:
            self.subscribed.clear()
            await client.aclose()


class LocalNoticeListener:
    """Registers with the in-process ChangeNotifier for as long as it runs (embedded mode)."""

    def __init__(self, *, notifier: ChangeNotifier, trigger: ReloadTrigger) -> None:
        self._notifier = notifier
        self._trigger = trigger

    async def run(self) -> None:
        remove = self._notifier.add_local_listener(self._trigger.notify_threadsafe)
        try:
            await asyncio.Event().wait()
        finally:
            remove()


@dataclass
class SubscriptionDiff:
    """What to send a connection so it streams ``new`` instead of ``old``."""

    subscribe: dict[int, str] = field(default_factory=dict)
    unsubscribe: list[int] = field(default_factory=list)
    mode_changes: dict[int, str] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (self.subscribe or self.unsubscribe or self.mode_changes)


def diff_subscriptions(old: Mapping[int, str], new: Mapping[int, str]) -> SubscriptionDiff:
    """Added tokens with their mode, removed tokens, and tokens whose mode changed."""
    diff = SubscriptionDiff()
    for token, mode in new.items():
        was = old.get(token)
        if was is None:
            diff.subscribe[token] = mode
        elif was != mode:
            diff.mode_changes[token] = mode
    diff.unsubscribe = sorted(t for t in old if t not in new)
    return diff
