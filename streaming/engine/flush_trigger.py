"""When the engine flushes: a short window after the first unflushed change, not a fixed tick.

The flush that publishes a change starts ``window_s`` after the first unflushed change, or
after the end of the previous flush when that is later; everything that arrives within the
window (or while a flush runs) goes into that same flush, where the pipeline's state keeps
only each instrument's newest tick (latest wins). Under load the window grows: after each
flush it becomes what that flush took (compute and publish), between ``min_window_s`` and
``cap_s``. So the pipeline rests at least as long as it last worked (at most half its time
flushing) until the window reaches the cap, and a change never waits more than the flush in
progress, ``cap_s`` and its own flush, however hard the flood.

An engine with nothing new does not flush. Work that time alone brings (a forward source
going stale, a chain refresh at its phase, analytics waiting for their interval) gets a
follow-up flush when it is due, at least ``cap_s`` after the last flush, so it is never
stranded when the frames stop and never makes the engine spin.

The flush itself runs on the pipeline's thread (:class:`~streaming.engine.worker.PipelineWorker`):
the event loop only awaits it, and frames keep being queued meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

__all__ = ["FlushTrigger"]

DEFAULT_MIN_WINDOW_S = 0.015
DEFAULT_CAP_S = 0.1


class FlushTrigger:
    """Coalesces changes into flushes: ``changed()`` on each frame, ``run(flush)`` in a task.

    ``clock`` is monotonic seconds (injectable: the decisions are plain methods, so tests
    drive :meth:`changed`, :meth:`due_in`, :meth:`flush_started` and :meth:`flush_finished`
    with a clock of their own).
    """

    def __init__(
        self,
        *,
        min_window_s: float = DEFAULT_MIN_WINDOW_S,
        cap_s: float = DEFAULT_CAP_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < min_window_s <= cap_s:
            raise ValueError(
                f"flush window must satisfy 0 < window <= cap: window={min_window_s}s cap={cap_s}s"
            )
        self.min_window_s = float(min_window_s)
        self.cap_s = float(cap_s)
        self._clock = clock
        #: The current window: what the last flush took, within [min_window_s, cap_s].
        self.window_s = self.min_window_s
        self._first_change: float | None = None
        self._last_finished = float("-inf")
        self._follow_up_at: float | None = None
        self._flush_started: float | None = None
        self._woken = asyncio.Event()

    # --- decisions (plain, clock-driven) ----------------------------------------------------

    def changed(self) -> None:
        """Something new waits to be flushed (event loop; called per frame, so cheap)."""
        if self._first_change is None:
            self._first_change = self._clock()
            self._woken.set()

    def due_in(self) -> float | None:
        """Seconds until the next flush should start (0: now); None when there is nothing to do."""
        deadlines = []
        if self._first_change is not None:
            deadlines.append(max(self._first_change, self._last_finished) + self.window_s)
        if self._follow_up_at is not None:
            deadlines.append(self._follow_up_at)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - self._clock())

    def flush_started(self) -> None:
        """A flush takes everything queued until now; later changes wait for the next one."""
        self._first_change = None
        self._follow_up_at = None
        self._woken.clear()
        self._flush_started = self._clock()

    def flush_finished(self, *, next_due_in: float | None = None) -> None:
        """The flush (compute and publish) is done; ``next_due_in``: seconds until time alone
        gives the next flush work (None: nothing waits on the clock)."""
        now = self._clock()
        started = now if self._flush_started is None else self._flush_started
        self._flush_started = None
        self._last_finished = now
        self.window_s = min(max(now - started, self.min_window_s), self.cap_s)
        if next_due_in is not None:
            self._follow_up_at = now + max(next_due_in, self.cap_s)

    # --- the loop ---------------------------------------------------------------------------

    async def run(self, flush: Callable[[], Awaitable[float | None]]) -> None:
        """Flush when due, forever; ``flush()`` returns its ``next_due_in``."""
        while True:
            delay = self.due_in()
            if delay is None:
                await self._woken.wait()
                continue
            if delay > 0:
                if self._first_change is None:
                    # Only a follow-up is due: a new change may bring the flush forward.
                    try:
                        async with asyncio.timeout(delay):
                            await self._woken.wait()
                    except TimeoutError:
                        pass
                else:
                    # A change is waiting: its deadline is fixed, later changes join it.
                    await asyncio.sleep(delay)
                continue
            self.flush_started()
            next_due_in = None
            try:
                next_due_in = await flush()
            finally:
                self.flush_finished(next_due_in=next_due_in)
