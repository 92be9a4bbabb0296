"""Owns every background task of the engine: named, restarted with backoff, reported, awaited.

A task is a coroutine factory with a name and an owner (the component or account it works
for). When the coroutine raises, the supervisor logs the error with its context, counts it,
shows it in the task's state (so the heartbeat and /health report it) and starts a fresh
coroutine after an exponential backoff. Nothing is fire-and-forget: ``shutdown`` cancels and
awaits every task, and ``stop_owner`` does the same for one owner's tasks.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog
from tenacity import wait_exponential_jitter

from streaming.kite.redaction import redact

log = structlog.get_logger(__name__)

#: How often a stopping task that has not ended yet is cancelled again.
RECANCEL_INTERVAL_S = 0.2

TaskStateName = Literal["running", "restarting", "failed", "finished", "stopped"]


@dataclass
class TaskState:
    """What the heartbeat reports about one supervised task."""

    name: str
    owner: str
    state: TaskStateName = "running"
    restarts: int = 0
    last_error: str = ""
    last_crash_monotonic: float | None = None
    started_monotonic: float = field(default_factory=time.monotonic)

    def as_dict(self, now_monotonic: float) -> dict[str, Any]:
        crash_age = (
            None
            if self.last_crash_monotonic is None
            else round(now_monotonic - self.last_crash_monotonic, 1)
        )
        return {
            "owner": self.owner,
            "state": self.state,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "last_crash_age_s": crash_age,
        }


@dataclass(frozen=True, slots=True)
class _Attempt:
    """The one field tenacity's wait strategies read from a RetryCallState."""

    attempt_number: int


class Supervisor:
    """Runs named tasks, restarts crashed ones with backoff, cancels and awaits them all."""

    def __init__(
        self,
        *,
        on_crash: Callable[[str, str, BaseException], None] | None = None,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        healthy_after_s: float = 60.0,
    ) -> None:
        # tenacity computes the delays; the restart loop is ours because a supervised task
        # is not one call to retry but a long-lived loop whose backoff resets once healthy.
        self._wait = wait_exponential_jitter(
            multiplier=backoff_initial_s, max=backoff_max_s, jitter=backoff_initial_s
        )
        self._healthy_after_s = healthy_after_s
        self._on_crash = on_crash
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._states: dict[str, TaskState] = {}
        self._closing = False

    # --- spawning --------------------------------------------------------------------------

    def spawn(
        self,
        name: str,
        factory: Callable[[], Awaitable[None]],
        *,
        owner: str,
        restart: bool = True,
    ) -> None:
        """Start ``factory()`` as task ``name``; a crash restarts it unless ``restart`` is False.

        A name is unique: spawning a name that is still running is a programming error.
        """
        if self._closing:
            raise RuntimeError(f"supervisor is shutting down; cannot spawn task {name!r}")
        existing = self._tasks.get(name)
        if existing is not None and not existing.done():
            raise RuntimeError(f"task {name!r} is already running (owner {owner!r})")
        state = TaskState(name=name, owner=owner)
        self._states[name] = state
        self._tasks[name] = asyncio.create_task(
            self._run(state, factory, restart), name=f"engine:{name}"
        )

    async def _run(
        self, state: TaskState, factory: Callable[[], Awaitable[None]], restart: bool
    ) -> None:
        attempt = 0
        while True:
            started = time.monotonic()
            state.state = "running"
            try:
                await factory()
            except asyncio.CancelledError:
                state.state = "stopped"
                raise
            # The supervision boundary: any error of a task is logged, counted and restarted.
            except Exception as exc:  # noqa: BLE001 - logged below with a redacted traceback
                if time.monotonic() - started >= self._healthy_after_s:
                    attempt = 0
                attempt += 1
                # Shown by the heartbeat and /health: a Kite URL in the text carries the token.
                state.last_error = redact(f"{type(exc).__name__}: {exc}")[:500]
                state.last_crash_monotonic = time.monotonic()
                if self._on_crash is not None:
                    # A failing hook must not end the supervision of this task.
                    try:
                        self._on_crash(state.name, state.owner, exc)
                    except Exception:
                        log.error("engine.on_crash_failed", task=state.name, exc_info=True)
                if not restart:
                    state.state = "failed"
                    log.error(
                        "engine.task_failed",
                        task=state.name,
                        owner=state.owner,
                        error=state.last_error,
                        traceback=_redacted_traceback(exc),
                    )
                    return
                delay_s = self._wait(_Attempt(attempt))  # type: ignore[arg-type]
                state.state = "restarting"
                log.error(
                    "engine.task_crashed",
                    task=state.name,
                    owner=state.owner,
                    restarts=state.restarts,
                    restart_in_s=round(delay_s, 2),
                    error=state.last_error,
                    traceback=_redacted_traceback(exc),
                )
                try:
                    await asyncio.sleep(delay_s)
                except asyncio.CancelledError:
                    state.state = "stopped"
                    raise
                state.restarts += 1
                log.info(
                    "engine.task_restarted",
                    task=state.name,
                    owner=state.owner,
                    restarts=state.restarts,
                )
                continue
            state.state = "finished"
            return

    # --- state -----------------------------------------------------------------------------

    def states(self) -> dict[str, dict[str, Any]]:
        """Every known task's state, for the heartbeat."""
        now = time.monotonic()
        return {name: st.as_dict(now) for name, st in sorted(self._states.items())}

    def state(self, name: str) -> TaskState | None:
        return self._states.get(name)

    def names(self, *, owner: str | None = None) -> list[str]:
        return [n for n, st in self._states.items() if owner is None or st.owner == owner]

    def is_running(self, name: str) -> bool:
        task = self._tasks.get(name)
        return task is not None and not task.done()

    # --- stopping --------------------------------------------------------------------------

    async def stop(self, name: str) -> None:
        """Cancel one task and wait for it; its state is forgotten."""
        task = self._tasks.pop(name, None)
        self._states.pop(name, None)
        if task is not None:
            await _cancel_and_wait([task])

    async def stop_owner(self, owner: str) -> None:
        """Cancel and await every task of one owner (an account losing its lease, say)."""
        names = self.names(owner=owner)
        tasks = [self._tasks.pop(n) for n in names if n in self._tasks]
        for n in names:
            self._states.pop(n, None)
        await _cancel_and_wait(tasks)

    async def shutdown(self) -> None:
        """Cancel every task and await them all; no task outlives the supervisor."""
        self._closing = True
        tasks = list(self._tasks.values())
        await _cancel_and_wait(tasks)


def _redacted_traceback(exc: BaseException) -> str:
    """The traceback as text with Kite credentials removed, never the raw exc_info."""
    return redact("".join(traceback.format_exception(exc)))


async def _cancel_and_wait(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait until every one has ended.

    The cancel is repeated until a task is done: on Python 3.11, ``asyncio.wait_for`` swallows
    a cancellation that lands just as its inner wait completes (a lease loop woken by a notice
    at the moment of shutdown), so a single cancel can be lost and the loop would run on.
    """
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_INTERVAL_S)
    for task in tasks:
        if task.cancelled():
            continue
        error = task.exception()
        if error is not None:
            log.warning("engine.task_stop_error", task=task.get_name(), error=repr(error))
