"""The mock market: a SyntheticMarket, owned by one task, feeding the same pipeline as Kite.

One coroutine owns the market: it steps it, takes ticks for the instruments the engine mocks
and hands them to the sink (the pipeline's ingest with ``is_mock=True``). Other code only
*tells* the feed which tokens to mock (:meth:`MockFeed.set_tokens`, on the same event loop);
the feed picks the change up at its next step. No locks, no shared mutable state across
threads: the race on shared mock state of the old service cannot happen.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping

import numpy as np
import structlog

from streaming.market import SyntheticMarket

log = structlog.get_logger(__name__)


class MockFeed:
    """Steps a synthetic market every ``interval_s`` and emits ticks for the wanted tokens."""

    def __init__(
        self,
        *,
        market: SyntheticMarket,
        sink: Callable[[np.ndarray], None],
        interval_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"mock interval_s must be positive, got {interval_s}")
        self._market = market
        self._sink = sink
        self.interval_s = interval_s
        self._clock = clock
        self._wanted: dict[int, str] = {}
        self._dirty = True
        self._rows = np.zeros(0, dtype=np.int64)
        self._lengths = np.zeros(0, dtype=np.uint16)
        self.unknown_tokens = 0
        self.ticks_emitted = 0
        self.steps = 0

    def set_tokens(self, tokens: Mapping[int, str]) -> None:
        """The tokens (-> Kite mode) to mock from the next step on."""
        wanted = dict(tokens)
        if wanted != self._wanted:
            self._wanted = wanted
            self._dirty = True

    @property
    def token_count(self) -> int:
        return len(self._wanted)

    def _resolve(self) -> None:
        tokens = np.fromiter(self._wanted.keys(), dtype=np.int64, count=len(self._wanted))
        modes = np.array(list(self._wanted.values()), dtype=object)
        known = np.isin(tokens, self._market.tokens)
        rows = self._market.rows_of(tokens[known])
        modes = modes[known]
        self.unknown_tokens = int(len(tokens) - len(rows))
        if self.unknown_tokens:
            # Instruments the synthetic market does not list (e.g. real Kite tokens): they
            # stay silent in mock mode rather than getting invented prices.
            log.warning("mock.unknown_tokens", count=self.unknown_tokens, known=len(rows))
        self._rows = rows
        self._lengths = (
            self._market.packet_lengths(rows, modes.astype(str))
            if len(rows)
            else np.zeros(0, dtype=np.uint16)
        )
        self._dirty = False

    def step_once(self) -> int:
        """Move the market to now and emit one batch of ticks; returns the number emitted."""
        if self._dirty:
            self._resolve()
        self._market.step(self._clock())
        self.steps += 1
        if not len(self._rows):
            return 0
        ticks = self._market.ticks_at(self._rows, self._lengths)
        self._sink(ticks)
        self.ticks_emitted += len(ticks)
        return len(ticks)

    async def run(self) -> None:
        """The supervised loop; it is the market's one owner."""
        next_at = time.monotonic()
        while True:
            self.step_once()
            next_at += self.interval_s
            delay = next_at - time.monotonic()
            if delay < 0:
                # Behind (a slow flush or a huge universe): skip, do not burst to catch up.
                next_at = time.monotonic()
                delay = 0
            await asyncio.sleep(delay)

    def underlying_prices(self) -> dict[str, float]:
        return {name: self._market.spot(name) for name in self._market.underlyings}
