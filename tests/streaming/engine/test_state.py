"""Tick state: vectorised ingest, what each packet kind sets and clears, order, sources."""

from __future__ import annotations

import numpy as np

from streaming.engine.state import TickState
from streaming.engine.universe import InstrumentUniverse
from tests.streaming.engine.builders import (
    E1,
    NIFTY_FUT,
    NIFTY_INDEX,
    NOW_S,
    nifty_rows,
    option_token,
    tick,
    ticks,
)

CE = option_token(E1, 26000.0, "CE")


def ingest(state, universe, batch, *, is_mock=False, received_s=NOW_S):
    slots, known = universe.slots_of(batch["instrument_token"])
    assert known.all()
    return state.ingest(slots, batch, is_mock=is_mock, received_s=received_s)


def setup():
    u = InstrumentUniverse.from_rows(nifty_rows())
    return u, TickState(len(u))


def slot(u, token):
    (s,), _ = u.slots_of([token])
    return s


def test_a_full_tick_sets_every_field():
    u, st = setup()
    result = ingest(st, u, tick(CE, 120.5, bid=120.0, ask=121.0, bid_qty=75, ask_qty=150,
                                volume=9000, oi=45000, close=100.0))
    s = slot(u, CE)
    assert (result.ticks, result.changed) == (1, 1)
    assert st.ltp[s] == 120.5
    assert (st.bid[s], st.ask[s], st.bid_qty[s], st.ask_qty[s]) == (120.0, 121.0, 75, 150)
    assert (st.volume[s], st.oi[s], st.close[s]) == (9000, 45000, 100.0)
    assert st.exchange_ts[s] == int(NOW_S)
    assert st.received_s[s] == NOW_S
    assert st.has_data[s] and st.dirty[s] and not st.is_mock[s]
    assert st.take_dirty().tolist() == [s]
    assert st.pending == 0


def test_packets_clear_fields_they_do_not_carry_but_keep_close():
    u, st = setup()
    ingest(st, u, tick(CE, 120.5, close=100.0))
    ingest(st, u, tick(CE, 121.0, length=8), received_s=NOW_S + 1)
    s = slot(u, CE)
    assert st.ltp[s] == 121.0
    assert st.close[s] == 100.0
    assert np.isnan(st.bid[s]) and np.isnan(st.ask[s])
    assert (st.bid_qty[s], st.ask_qty[s], st.volume[s], st.oi[s], st.exchange_ts[s]) == (-1, -1, -1, -1, 0)
    ingest(st, u, tick(CE, 121.5, length=44, volume=7))
    assert (st.volume[s], st.oi[s]) == (7, -1)


def test_an_empty_book_side_is_no_price_but_a_known_zero_quantity():
    u, st = setup()
    ingest(st, u, tick(CE, 0.05, bid=0.0, bid_qty=0))
    s = slot(u, CE)
    assert np.isnan(st.bid[s]) and st.bid_qty[s] == 0
    assert st.ask[s] == 0.1


def test_index_packets():
    u, st = setup()
    ingest(st, u, tick(NIFTY_INDEX, 26001.5, length=32, close=25900.0))
    s = slot(u, NIFTY_INDEX)
    assert (st.ltp[s], st.close[s], st.exchange_ts[s]) == (26001.5, 25900.0, int(NOW_S))
    assert st.volume[s] == -1 and np.isnan(st.bid[s])
    ingest(st, u, tick(NIFTY_INDEX, 26002.0, length=28, close=25900.0))
    assert st.exchange_ts[s] == 0


def test_the_last_tick_of_a_token_in_a_batch_wins():
    u, st = setup()
    result = ingest(st, u, ticks(tick(CE, 1.0), tick(NIFTY_FUT, 26050.0), tick(CE, 2.0), tick(CE, 3.0)))
    assert st.ltp[slot(u, CE)] == 3.0
    assert st.ltp[slot(u, NIFTY_FUT)] == 26050.0
    assert (result.ticks, result.changed) == (4, 2)


def test_an_older_tick_is_ignored():
    u, st = setup()
    ingest(st, u, tick(CE, 10.0, ts=int(NOW_S) + 5))
    result = ingest(st, u, tick(CE, 9.0, ts=int(NOW_S) + 4))
    assert result.older == 1 and result.changed == 0
    assert st.ltp[slot(u, CE)] == 10.0
    # A packet without a timestamp cannot be ordered and is taken.
    ingest(st, u, tick(CE, 9.5, length=44))
    assert st.ltp[slot(u, CE)] == 9.5


def test_the_same_tick_again_is_not_a_change():
    """The second account's copy of a tick, arriving after a flush, publishes nothing."""
    u, st = setup()
    ingest(st, u, tick(CE, 10.0))
    st.take_dirty()
    result = ingest(st, u, tick(CE, 10.0), received_s=NOW_S + 0.2)
    assert result.changed == 0
    assert st.pending == 0
    # ...but it proves the feed alive.
    assert st.received_s[slot(u, CE)] == NOW_S + 0.2
    assert ingest(st, u, tick(CE, 10.05)).changed == 1


def test_a_tick_from_the_other_source_resets_the_slot():
    u, st = setup()
    ingest(st, u, tick(CE, 10.0, volume=500, oi=99, close=8.0), is_mock=True)
    s = slot(u, CE)
    assert st.is_mock[s]
    result = ingest(st, u, tick(CE, 11.0, length=8), is_mock=False)
    assert result.source_resets == 1
    assert not st.is_mock[s]
    assert st.ltp[s] == 11.0
    # Nothing of the mock tick survives, not even close.
    assert np.isnan(st.close[s]) and st.volume[s] == -1 and st.oi[s] == -1
    # An older-looking live tick after a mock one is not compared with mock time.
    ingest(st, u, tick(CE, 12.0, ts=int(NOW_S) + 100), is_mock=True)
    result = ingest(st, u, tick(CE, 13.0, ts=int(NOW_S)), is_mock=False)
    assert (result.older, st.ltp[s]) == (0, 13.0)


def test_carried_to_moves_slots():
    u, st = setup()
    ingest(st, u, ticks(tick(CE, 10.0), tick(NIFTY_FUT, 26050.0)), is_mock=True)
    s_ce, s_fut = slot(u, CE), slot(u, NIFTY_FUT)
    out = st.carried_to(3, np.array([s_ce, s_fut]), np.array([2, 0]))
    assert out.ltp[2] == 10.0 and out.ltp[0] == 26050.0
    assert out.is_mock[[0, 2]].all() and out.has_data[[0, 2]].all()
    assert not out.has_data[1] and np.isnan(out.ltp[1])
    assert out.dirty[[0, 2]].all()
