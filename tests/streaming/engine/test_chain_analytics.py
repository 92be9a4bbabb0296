"""The engine's chain analytics on the real snapshot pipeline: values against a chain computed
by hand, unknowns null, the cadence, OI baselines per trading day, the minute samples, and IV
rank and percentile from seeded history (an injected clock, the real database)."""

from __future__ import annotations

import asyncio
import datetime as dt

import numpy as np
import pytest

from streaming import schema
from streaming.engine.chain_analytics import ChainAnalytics
from streaming.engine.metrics import EngineMetrics
from streaming.engine.minutesink import ChainMinuteSink
from streaming.engine.pipeline import SnapshotPipeline
from streaming.engine.universe import InstrumentUniverse
from streaming.greeks import IST
from streaming.models import ChainMinute
from streaming.protocol import AnalyticsMessage
from tests.streaming.engine.builders import (
    E1,
    E2,
    NIFTY_FUT,
    NOW_S,
    nifty_rows,
    option_token,
    tick,
    ticks,
)

GROUP = schema.chain_group("NIFTY", E1)


def universe() -> InstrumentUniverse:
    return InstrumentUniverse.from_rows(
        [{**row, "lot_size": 75 if row["instrument_type"] in ("CE", "PE") else 1} for row in nifty_rows()]
    )


def ce(strike):
    return option_token(E1, strike, "CE")


def pe(strike):
    return option_token(E1, strike, "PE")


def opening(pipeline, analytics, now):
    """The day's first ticks: the future and E1's options, the 26100 put in LTP mode (no OI)."""
    pipeline.ingest(
        ticks(
            tick(NIFTY_FUT, 26000.0),
            tick(ce(25900), 200.0, oi=1000),
            tick(ce(26000), 150.0, oi=2000),
            tick(ce(26100), 100.0, oi=3000),
            tick(pe(25900), 100.0, oi=3000),
            tick(pe(26000), 150.0, oi=2000),
            tick(pe(26100), 200.0, length=8),
        ),
        is_mock=False,
        received_epoch_s=now,
    )
    pipeline.flush(now)
    analytics.observe(pipeline, now)


def later(pipeline, analytics, now):
    """Trading since the open: prices against the previous close, OI against the baseline."""
    pipeline.ingest(
        ticks(
            tick(ce(25900), 230.0, oi=1500, close=200.0),  # price up, OI up
            tick(ce(26000), 140.0, oi=2500, close=150.0),  # price down, OI up
            tick(ce(26100), 90.0, oi=2500, close=100.0),  # price down, OI down
            tick(pe(25900), 110.0, oi=2500, close=100.0),  # price up, OI down
            tick(pe(26000), 150.0, oi=2200, close=150.0),  # price unchanged
        ),
        is_mock=False,
        received_epoch_s=now,
    )
    pipeline.flush(now)
    analytics.observe(pipeline, now)


@pytest.fixture
def chain():
    pipeline = SnapshotPipeline(universe(), r=0.065, stale_after_s=30.0)
    analytics = ChainAnalytics(interval_s=1.0, iv_window_days=365)
    return pipeline, analytics


def test_analytics_of_a_hand_made_chain(chain):
    pipeline, analytics = chain
    opening(pipeline, analytics, NOW_S)
    analytics.due(pipeline, NOW_S, None)
    later(pipeline, analytics, NOW_S + 5)
    sent = analytics.due(pipeline, NOW_S + 5, None)
    assert [group for group, _ in sent] == [GROUP]  # E2 has no data: nothing to send
    message = AnalyticsMessage.model_validate_json(sent[0][1])
    s = message.summary
    assert (message.underlying, message.expiry, message.ts) == ("NIFTY", E1, int((NOW_S + 5) * 1000))
    assert (s.forward, s.forward_source, s.forward_stale) == (26000.0, "future", False)
    assert (s.atm_strike, s.lot_size, s.is_mock) == (26000.0, 75, False)
    # Puts' OI 2500 + 2200 (the 26100 put's is unknown) over the calls' 1500 + 2500 + 2500.
    assert s.pcr_oi == round(4700 / 6500, 4)
    assert s.pcr_volume == round(2000 / 3000, 4)  # the LTP-mode put has no volume either
    # Pain at 25900: 2200*100 = 220000; at 26000: 1500*100 = 150000; at 26100: 550000.
    assert s.max_pain == 26000.0
    assert s.straddle == 290.0  # 140 + 150
    iv = pipeline.iv[pipeline.universe.slots_of([ce(26000), pe(26000)])[0]]
    assert s.atm_iv == round(float(np.mean(iv)), 6) and s.atm_iv > 0
    expiry_s = float(pipeline.universe.chain_expiry_epoch_s[0])
    assert s.days_to_expiry == round((expiry_s - NOW_S - 5) / 86_400, 2)
    assert s.oi_change_since == int(NOW_S * 1000)
    # No stored history yet: rank and percentile unknown, the window stated.
    assert (s.iv_rank, s.iv_percentile, s.iv_window_days) == (None, None, 365)

    rows = {row.strike: row for row in message.rows}
    assert sorted(rows) == [25900.0, 26000.0, 26100.0]
    assert (rows[25900].ce.oi_change, rows[25900].ce.buildup) == (500, "long_buildup")
    assert (rows[26000].ce.oi_change, rows[26000].ce.buildup) == (500, "short_buildup")
    assert (rows[26100].ce.oi_change, rows[26100].ce.buildup) == (-500, "long_unwinding")
    assert (rows[25900].pe.oi_change, rows[25900].pe.buildup) == (-500, "short_covering")
    assert (rows[26000].pe.oi_change, rows[26000].pe.buildup) == (200, None)
    put = rows[26100].pe
    assert (put.token, put.ltp) == (pe(26100), 200.0)
    assert (put.oi, put.oi_change, put.buildup, put.bid, put.bid_qty, put.volume) == (None,) * 6
    call = rows[25900].ce
    assert (call.bid, call.ask, call.bid_qty, call.ask_qty) == (229.95, 230.05, 10, 20)

    # Term structure: both expiries, E2 unknown (no forward, no prices).
    assert [(p.expiry, p.forward) for p in message.term_structure] == [(E1, 26000.0), (E2, None)]
    assert message.term_structure[0].atm_iv == s.atm_iv
    assert message.term_structure[1].atm_iv is None


def test_a_chain_is_sent_at_most_once_per_interval_only_when_changed_and_watched(chain):
    pipeline, analytics = chain
    opening(pipeline, analytics, NOW_S)
    assert analytics.due(pipeline, NOW_S, frozenset()) == []  # nobody listens
    assert [g for g, _ in analytics.due(pipeline, NOW_S, frozenset({GROUP}))] == [GROUP]
    later(pipeline, analytics, NOW_S + 0.5)
    assert analytics.due(pipeline, NOW_S + 0.5, None) == []  # within the interval
    assert [g for g, _ in analytics.due(pipeline, NOW_S + 1.0, None)] == [GROUP]
    assert analytics.due(pipeline, NOW_S + 3.0, None) == []  # nothing changed since
    # A new subscriber gets the latest message at once, and nothing for a chain not streamed.
    latest = analytics.latest(pipeline, [GROUP, "chain.NOPE.20261124"], NOW_S + 3.0)
    assert [g for g, _ in latest] == [GROUP]
    assert AnalyticsMessage.model_validate_json(latest[0][1]).ts == int((NOW_S + 1.0) * 1000)


def test_the_oi_baseline_is_the_first_tick_of_each_trading_day(chain):
    pipeline, analytics = chain
    opening(pipeline, analytics, NOW_S)
    later(pipeline, analytics, NOW_S + 5)
    tomorrow = NOW_S + 86_400
    pipeline.ingest(ticks(tick(ce(25900), 231.0, oi=1700, close=230.0)), is_mock=False,
                    received_epoch_s=tomorrow)
    pipeline.flush(tomorrow)
    analytics.observe(pipeline, tomorrow)
    pipeline.ingest(ticks(tick(ce(25900), 232.0, oi=1750, close=230.0)), is_mock=False,
                    received_epoch_s=tomorrow + 60)
    pipeline.flush(tomorrow + 60)
    analytics.observe(pipeline, tomorrow + 60)
    [(_, item)] = analytics.due(pipeline, tomorrow + 60, None)
    message = AnalyticsMessage.model_validate_json(item)
    row = next(r for r in message.rows if r.strike == 25900.0)
    assert row.ce.oi_change == 50  # from today's first tick (1700), not yesterday's
    # The other options have not ticked today: their baselines are yesterday's.
    assert message.summary.oi_change_since == int(tomorrow * 1000)


def test_a_reload_keeps_the_baselines_of_kept_options(chain):
    pipeline, analytics = chain
    opening(pipeline, analytics, NOW_S)
    pipeline.set_universe(universe())
    later(pipeline, analytics, NOW_S + 5)
    [(_, item)] = analytics.due(pipeline, NOW_S + 5, None)
    rows = {r.strike: r for r in AnalyticsMessage.model_validate_json(item).rows}
    assert rows[25900].ce.oi_change == 500


def test_minute_samples_once_a_minute_for_chains_with_data(chain):
    pipeline, analytics = chain
    opening(pipeline, analytics, NOW_S)
    rows = analytics.minute_rows(pipeline, NOW_S)
    assert [(r["underlying"], r["expiry"], r["is_mock"]) for r in rows] == [("NIFTY", E1, False)]
    assert rows[0]["minute"] == dt.datetime.fromtimestamp(NOW_S // 60 * 60, tz=dt.UTC)
    assert rows[0]["straddle"] == 300.0 and rows[0]["atm_iv"] > 0
    assert analytics.minute_rows(pipeline, NOW_S + 30) == []
    assert len(analytics.minute_rows(pipeline, NOW_S + 60)) == 1


@pytest.mark.django_db(transaction=True)
def test_iv_rank_and_percentile_from_stored_days(chain):
    pipeline, analytics = chain
    today = dt.datetime.fromtimestamp(NOW_S, IST).date()

    def at(days_ago, hour, minute):
        day = today - dt.timedelta(days=days_ago)
        return dt.datetime(day.year, day.month, day.day, hour, minute, tzinfo=IST)

    def row(minute, atm_iv, **extra):
        return ChainMinute(underlying="NIFTY", expiry=E1, minute=minute, atm_iv=atm_iv, **extra)

    ChainMinute.objects.bulk_create([
        # Each day's last minute is its daily value: 0.05, 0.40 and 0.10.
        row(at(3, 10, 0), 0.90), row(at(3, 15, 29), 0.05),
        row(at(2, 15, 29), 0.40),
        row(at(1, 9, 15), 0.10), row(at(1, 9, 16), None),
        row(at(400, 15, 29), 0.01),  # outside the window
        row(at(1, 15, 29), 0.99, is_mock=True),  # the synthetic market's: another history
        row(at(0, 9, 30), 0.77),  # today: not history
    ])  # fmt: skip
    sink = ChainMinuteSink(
        metrics=EngineMetrics(),
        set_history=lambda history: _set(analytics, history),
        window_days=365,
        clock=lambda: NOW_S,
    )
    opening(pipeline, analytics, NOW_S)
    sink.add(analytics.minute_rows(pipeline, NOW_S))
    asyncio.run(sink.step())
    assert sink.unsaved == 0
    stored = ChainMinute.objects.get(underlying="NIFTY", expiry=E1, is_mock=False,
                                     minute=dt.datetime.fromtimestamp(NOW_S // 60 * 60, dt.UTC))
    [(_, item)] = analytics.due(pipeline, NOW_S, None)
    s = AnalyticsMessage.model_validate_json(item).summary
    assert stored.atm_iv == pytest.approx(s.atm_iv, abs=1e-6)
    current = s.atm_iv
    assert 0.10 < current < 0.40  # premiums of about 13% vol
    low, high = 0.05, 0.40
    assert s.iv_rank == round(100 * (current - low) / (high - low), 1)
    assert s.iv_percentile == round(100 * 2 / 3, 1)  # 0.05 and 0.10 of three days are below


async def _set(analytics, history):
    analytics.set_history(history)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="interval_s"):
        ChainAnalytics(interval_s=0, iv_window_days=365)
    with pytest.raises(ValueError, match="iv_window_days"):
        ChainAnalytics(interval_s=1, iv_window_days=0)

