"""The pipeline worker: a bounded inbox, and reads that never block the event loop."""

import asyncio
import threading
import time

import numpy as np
import orjson
from channels.layers import InMemoryChannelLayer

from streaming import schema
from streaming.engine.bars import BarAggregator
from streaming.engine.metrics import EngineMetrics
from streaming.engine.pipeline import SnapshotPipeline
from streaming.engine.publisher import Publisher
from streaming.engine.universe import InstrumentUniverse
from streaming.engine.worker import MAX_INBOX_BYTES, PipelineWorker
from streaming.kite.codec import TICK_DTYPE
from tests.helpers import async_wait_until
from tests.streaming.engine.builders import (
    E1,
    NIFTY_INDEX,
    NOW_S,
    nifty_rows,
    option_token,
    tick,
    ticks,
)

CE = option_token(E1, 26000.0, "CE")


class SlowFlushPipeline(SnapshotPipeline):
    """A pipeline whose flush runs until ``release`` is set: a long flush, held on purpose."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.in_flush = threading.Event()
        self.release = threading.Event()

    def flush(self, now, *, watched=None):
        self.in_flush.set()
        self.release.wait(timeout=30)
        return super().flush(now, watched=watched)


async def watch_the_loop(gaps: list[float]) -> None:
    """Record how late each short sleep wakes: a blocked event loop shows as a long gap."""
    last = time.monotonic()
    while True:
        await asyncio.sleep(0.01)
        gaps.append(time.monotonic() - last)
        last = time.monotonic()


def worker_of(pipeline: SnapshotPipeline, **kwargs) -> PipelineWorker:
    return PipelineWorker(pipeline=pipeline, bars=BarAggregator({}), metrics=EngineMetrics(),
                          clock=lambda: NOW_S, **kwargs)


def test_the_inbox_is_bounded_in_bytes_and_drops_the_oldest_frames():
    frame_bytes = 100 * TICK_DTYPE.itemsize
    worker = worker_of(
        SnapshotPipeline(InstrumentUniverse.from_rows(nifty_rows()), r=0.065, stale_after_s=30.0),
        max_inbox_bytes=10 * frame_bytes,
    )
    try:
        for _ in range(15):
            worker.enqueue(np.zeros(100, dtype=TICK_DTYPE), is_mock=False)
        assert worker.inbox_bytes == 10 * frame_bytes
        dropped = worker._metrics.dropped.labels("inbox_overflow")._value.get()
        assert dropped == 5 * 100
    finally:
        worker.shutdown()
    # Small by default: a stalled pipeline thread holds tens of megabytes, not hundreds.
    assert MAX_INBOX_BYTES <= 64 * 1024 * 1024


async def test_an_initial_state_request_during_a_long_flush_never_blocks_the_event_loop():
    pipeline = SlowFlushPipeline(InstrumentUniverse.from_rows(nifty_rows()), r=0.065,
                                 stale_after_s=30.0)
    pipeline.ingest(ticks(tick(NIFTY_INDEX, 26000.0, length=32), tick(CE, 120.0)), is_mock=False,
                    received_epoch_s=NOW_S)
    worker = worker_of(pipeline)
    layer = InMemoryChannelLayer()
    publisher = Publisher(layer)
    server = asyncio.create_task(publisher.serve_snapshot_requests(worker.reads))
    flush = asyncio.create_task(worker.flush(frozenset()))
    gaps: list[float] = []
    watcher = asyncio.create_task(watch_the_loop(gaps))
    try:
        await async_wait_until(pipeline.in_flush.is_set, timeout_s=10, what="the flush started")
        await async_wait_until(lambda: layer.groups.get(schema.SNAPSHOT_REQUESTS_GROUP),
                               timeout_s=10, what="the request loop listening")
        consumer = await layer.new_channel()
        await asyncio.sleep(0.05)
        # Released from another thread, whatever the event loop does meanwhile.
        threading.Timer(1.0, pipeline.release.set).start()
        await layer.group_send(
            schema.SNAPSHOT_REQUESTS_GROUP,
            schema.snapshot_request_message(reply_to=consumer, tokens=[CE]),
        )
        answer = asyncio.create_task(asyncio.wait_for(layer.receive(consumer), 30))
        await asyncio.wait([answer])
        watcher.cancel()
        message = await answer
        await flush
    finally:
        pipeline.release.set()
        server.cancel()
        watcher.cancel()
        await asyncio.gather(server, flush, watcher, return_exceptions=True)
        worker.shutdown()
    # The request waited for the flush on the pipeline's thread, not on the loop.
    assert max(gaps) < 0.5, f"the event loop stalled for {max(gaps):.2f} s"
    assert message["tokens"] == [CE]
    assert orjson.loads(message["items"][0])["ltp"] == 120.0

