"""Where bars go: drained on shutdown with the open minute, and a batch the database refuses
for good is not retried forever."""

import datetime as dt

import pytest
from channels.layers import InMemoryChannelLayer

from streaming.engine.bars import BarAggregator
from streaming.engine.barsink import BarSink
from streaming.engine.metrics import EngineMetrics
from streaming.engine.publisher import Publisher
from streaming.engine.store import run_db
from streaming.models import UnderlyingBar
from subscriptions.models import Instrument
from tests.streaming.engine.builders import NIFTY_INDEX, NOW_S, index_row, tick, ticks

pytestmark = pytest.mark.django_db(transaction=True)

MINUTE_S = int(NOW_S) // 60 * 60


def sink_of(metrics: EngineMetrics, *, due=()) -> BarSink:
    batches = [list(due)]

    async def close_due():  # the given bars close once, then none
        return batches.pop() if batches else []

    return BarSink(publisher=Publisher(InMemoryChannelLayer()), metrics=metrics, close_due=close_due)


def nifty_index() -> Instrument:
    row = index_row()
    return Instrument.objects.create(
        instrument_token=row["instrument_token"], exchange_token=1001,
        tradingsymbol=row["tradingsymbol"], name=row["name"], instrument_type="EQ",
        segment="INDICES", exchange="NSE",
    )  # fmt: skip


def stored() -> list[tuple[int, dt.datetime, float, int]]:
    return list(UnderlyingBar.objects.order_by("instrument_id", "start")
                .values_list("instrument_id", "start", "close", "tick_count"))


async def test_shutdown_drains_every_bar_the_open_minute_included():
    await run_db(nifty_index)
    bars = BarAggregator({NIFTY_INDEX: "NIFTY"})
    bars.ingest(ticks(tick(NIFTY_INDEX, 26000.0, ts=MINUTE_S + 5, length=32),
                      tick(NIFTY_INDEX, 26010.0, ts=MINUTE_S + 20, length=32)),
                is_mock=False, received_epoch_s=MINUTE_S + 20)
    sink = sink_of(EngineMetrics())

    await sink.drain(bars.close_all())

    start = dt.datetime.fromtimestamp(MINUTE_S, tz=dt.UTC)
    assert await run_db(stored) == [(NIFTY_INDEX, start, 26010.0, 2)]
    assert sink.unsaved == 0 and bars.open_bars() == {}


async def test_a_batch_with_a_permanent_error_is_saved_bar_by_bar_not_retried_forever():
    await run_db(nifty_index)
    aggregator = BarAggregator({NIFTY_INDEX: "NIFTY", 424242: "GONE"})
    aggregator.ingest(ticks(tick(NIFTY_INDEX, 26000.0, ts=MINUTE_S + 5, length=32),
                            tick(424242, 10.0, ts=MINUTE_S + 5, length=32)),
                      is_mock=False, received_epoch_s=MINUTE_S + 5)
    metrics = EngineMetrics()
    # Instrument 424242 is not in the table: its bar breaks the foreign key on every try.
    sink = sink_of(metrics, due=aggregator.close_all())

    await sink.step()
    assert sink.unsaved == 0
    assert [row[0] for row in await run_db(stored)] == [NIFTY_INDEX]
    assert metrics.dropped.labels("bar_refused")._value.get() == 1
    await sink.step()  # nothing left to retry
    assert metrics.dropped.labels("bar_refused")._value.get() == 1
