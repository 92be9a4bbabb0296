"""The flush trigger: a short window after the first change, growing under load to the cap.

The decisions are driven with a clock of the test's own; the loop, with the real pipeline
worker, shows coalescing and latest-wins end to end.
"""

import asyncio

import orjson
import pytest

from streaming.engine.bars import BarAggregator
from streaming.engine.config import EngineConfig
from streaming.engine.flush_trigger import FlushTrigger
from streaming.engine.metrics import EngineMetrics
from streaming.engine.pipeline import SnapshotPipeline
from streaming.engine.universe import InstrumentUniverse
from streaming.engine.worker import PipelineWorker
from tests.helpers import async_wait_until
from tests.streaming.engine.builders import E1, NOW_S, nifty_rows, option_token, tick

CE = option_token(E1, 26000.0, "CE")
WINDOW_S = 0.015
CAP_S = 0.1


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def trigger_on(clock: FakeClock) -> FlushTrigger:
    return FlushTrigger(min_window_s=WINDOW_S, cap_s=CAP_S, clock=clock)


def flush(trigger: FlushTrigger, clock: FakeClock, *, takes_s: float, next_due_in=None) -> None:
    trigger.flush_started()
    clock.advance(takes_s)
    trigger.flush_finished(next_due_in=next_due_in)


def test_an_idle_engine_does_not_flush():
    clock = FakeClock()
    trigger = trigger_on(clock)
    assert trigger.due_in() is None
    clock.advance(3600)
    assert trigger.due_in() is None
    # After a flush with nothing left over, idle again.
    trigger.changed()
    flush(trigger, clock, takes_s=0.002)
    clock.advance(60)
    assert trigger.due_in() is None


def test_many_frames_within_the_window_make_one_flush_a_window_after_the_first():
    clock = FakeClock()
    trigger = trigger_on(clock)
    trigger.changed()
    for _ in range(10):
        clock.advance(0.001)
        trigger.changed()  # later frames do not push the deadline back
        assert trigger.due_in() == pytest.approx(WINDOW_S - (clock.now - 1000.0))
    clock.advance(WINDOW_S)
    assert trigger.due_in() == 0.0
    trigger.flush_started()
    # Everything so far went into that flush: nothing else is due.
    assert trigger.due_in() is None


def test_frames_during_a_flush_coalesce_into_the_next():
    clock = FakeClock()
    trigger = trigger_on(clock)
    trigger.changed()
    trigger.flush_started()
    clock.advance(0.004)
    trigger.changed()  # arrives while the flush runs
    clock.advance(0.004)
    trigger.changed()
    assert trigger.due_in() == pytest.approx(WINDOW_S - 0.004)
    clock.advance(0.002)
    trigger.flush_finished()  # took 10 ms: the window stays at its floor
    assert trigger.window_s == WINDOW_S
    # The next flush starts one window after the previous one ended, not earlier.
    assert trigger.due_in() == pytest.approx(WINDOW_S)


def test_the_window_grows_with_the_flush_time_and_never_passes_the_cap():
    clock = FakeClock()
    trigger = trigger_on(clock)
    windows = []
    waits = []
    for took in (0.005, 0.03, 0.06, 0.25, 0.4, 0.02, 0.001):
        trigger.changed()  # a sustained flood: something new before every flush
        waits.append(trigger.due_in())
        clock.advance(trigger.due_in())
        flush(trigger, clock, takes_s=took)
        windows.append(trigger.window_s)
    assert windows == pytest.approx([WINDOW_S, 0.03, 0.06, CAP_S, CAP_S, 0.02, WINDOW_S])
    # No change waits more than the cap for its flush to start, however long the flushes.
    assert max(waits) <= CAP_S + 1e-9


def test_under_a_flood_each_flush_drains_everything_queued_before_it():
    """Bounded: the inbox holds only what came since the current flush started."""
    universe = InstrumentUniverse.from_rows(nifty_rows())
    pipeline = SnapshotPipeline(universe, r=0.065, stale_after_s=30.0)
    clock = FakeClock()
    trigger = trigger_on(clock)
    worker = PipelineWorker(pipeline=pipeline, bars=BarAggregator({}), metrics=EngineMetrics(),
                            clock=lambda: NOW_S, flush_trigger=trigger)
    try:

        async def flood():
            frame = tick(CE, 100.0)
            for round_ in range(20):
                for i in range(50):
                    frame["last_price"] = 100.0 + round_ + i * 0.05
                    worker.enqueue(frame.copy(), is_mock=False)
                clock.advance(trigger.due_in())
                trigger.flush_started()
                assert worker.inbox_bytes == 50 * frame.nbytes
                outcome = await worker.flush(None)
                assert worker.inbox_bytes == 0
                assert pipeline.pending == 0
                assert outcome.pending <= 1
                clock.advance(0.5)  # a slow machine: each flush takes longer than the cap
                trigger.flush_finished(next_due_in=outcome.next_due_in)
                assert trigger.window_s == CAP_S

        asyncio.run(flood())
    finally:
        worker.shutdown()


def test_work_that_time_brings_gets_a_follow_up_flush_never_sooner_than_the_cap():
    clock = FakeClock()
    trigger = trigger_on(clock)
    trigger.changed()
    flush(trigger, clock, takes_s=0.002, next_due_in=30.0)  # a forward goes stale in 30 s
    assert trigger.due_in() == pytest.approx(30.0)
    clock.advance(30.0)
    flush(trigger, clock, takes_s=0.002, next_due_in=0.0)  # due again at once: not a spin
    assert trigger.due_in() == pytest.approx(CAP_S)
    # A new frame brings the flush forward to its own window.
    trigger.changed()
    assert trigger.due_in() == pytest.approx(WINDOW_S)
    clock.advance(WINDOW_S)
    flush(trigger, clock, takes_s=0.002)
    assert trigger.due_in() is None


def test_a_window_above_the_cap_is_refused_with_the_settings_named():
    with pytest.raises(ValueError, match="window"):
        FlushTrigger(min_window_s=0.2, cap_s=0.1)
    with pytest.raises(ValueError, match="TICKER_FLUSH_WINDOW_MS"):
        EngineConfig(engine_id="e", flush_window_ms=150, flush_interval_ms=100)
    with pytest.raises(ValueError, match="TICKER_FLUSH_WINDOW_MS"):
        EngineConfig(engine_id="e", flush_window_ms=0)


async def test_the_loop_coalesces_frames_into_one_flush_that_publishes_the_newest_state():
    universe = InstrumentUniverse.from_rows(nifty_rows())
    pipeline = SnapshotPipeline(universe, r=0.065, stale_after_s=30.0)
    # A long window (real time) so that every frame below lands in it on a loaded machine.
    trigger = FlushTrigger(min_window_s=0.5, cap_s=1.0)
    worker = PipelineWorker(pipeline=pipeline, bars=BarAggregator({}), metrics=EngineMetrics(),
                            flush_trigger=trigger)
    published = []

    async def flush() -> bool:
        outcome = await worker.flush(None)
        if outcome.batches:
            published.append([(b.tokens, b.items) for b in outcome.batches])
        return outcome.next_due_in

    loop = asyncio.create_task(trigger.run(flush))
    try:
        for price in (100.0, 101.0, 102.5):
            worker.enqueue(tick(CE, price), is_mock=False)
        await async_wait_until(lambda: published, timeout_s=10, what="the flush")
        [batches] = published
        snapshots = [
            (token, orjson.loads(item))
            for tokens, items in batches
            for token, item in zip(tokens, items, strict=True)
        ]
        # One snapshot of the instrument, with the last of the three prices.
        assert [(token, snap["ltp"]) for token, snap in snapshots] == [(CE, 102.5)]
        # Nothing new: the loop waits without flushing, and nothing more was published.
        await async_wait_until(lambda: trigger.due_in() is None, timeout_s=10, what="idle")
        assert len(published) == 1
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        worker.shutdown()
