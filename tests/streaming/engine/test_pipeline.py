"""The snapshot pipeline: forwards, Greeks on what changed, one batch per group, sources kept
apart, and the snapshot schema (with its documentation) as the one truth."""

from __future__ import annotations

import datetime as dt
import math
import re
from pathlib import Path

import numpy as np
import orjson
import pytest

from streaming import schema
from streaming.engine.pipeline import SnapshotPipeline
from streaming.engine.universe import InstrumentUniverse
from streaming.greeks import (
    black76_price,
    compute_greeks,
    forward_from_parity,
    years_to_expiry,
)
from streaming.market import SyntheticMarket
from tests.streaming.engine.builders import (
    E1,
    E2,
    NIFTY_FUT,
    NIFTY_INDEX,
    NOW_S,
    STRIKES,
    market_universe,
    nifty_rows,
    option_token,
    tick,
    ticks,
)

R = 0.065
SIGMA = 0.12
SPOT = 26000.0
FORWARD = {E1: 26050.0, E2: 26080.0}
DOC = Path(__file__).resolve().parents[3] / "docs" / "snapshot-schema.md"


def premium(expiry, strike, kind, *, forward=None, now=NOW_S):
    """A Black-76 premium rounded to the 0.05 tick, as the exchange would show it."""
    u = InstrumentUniverse.from_rows(nifty_rows())
    t = float(years_to_expiry(now_epoch_s=now, expiry_epoch_s=u.chain_expiry_epoch_s[[E1, E2].index(expiry)]))
    p = black76_price(
        forward=FORWARD[expiry] if forward is None else forward,
        strike=strike,
        t_years=t,
        sigma=SIGMA,
        r=R,
        is_call=kind == "CE",
    )
    return max(round(float(p) / 0.05) * 0.05, 0.05)


def chain_ticks(expiry, *, forward=None, kinds=("CE", "PE"), now=NOW_S):
    return ticks(
        *(
            tick(option_token(expiry, k, kind), premium(expiry, k, kind, forward=forward, now=now), ts=int(now))
            for k in STRIKES
            for kind in kinds
        )
    )


def make_pipeline(rows=None, **kwargs):
    u = InstrumentUniverse.from_rows(nifty_rows() if rows is None else rows)
    kwargs.setdefault("r", R)
    kwargs.setdefault("stale_after_s", 30.0)
    return SnapshotPipeline(u, clock=lambda: NOW_S, **kwargs)


def full_market(p, *, now=NOW_S, is_mock=False):
    p.ingest(
        ticks(
            tick(NIFTY_INDEX, SPOT, length=32, close=25900.0, ts=int(now)),
            tick(NIFTY_FUT, FORWARD[E1], ts=int(now)),
            chain_ticks(E1, now=now),
            chain_ticks(E2, now=now),
        ),
        is_mock=is_mock,
        received_epoch_s=now,
    )


def snapshots(batches):
    """token -> parsed snapshot over all batches; fails if a token appears twice."""
    out = {}
    for batch in batches:
        assert len(batch.tokens) == len(batch.items)
        for token, item in zip(batch.tokens, batch.items, strict=True):
            assert token not in out, f"token {token} published twice in one flush"
            out[token] = orjson.loads(item)
    return out


# --- schema ---------------------------------------------------------------------------------


def test_a_snapshot_has_every_schema_field_in_order_with_its_values():
    p = make_pipeline()
    full_market(p)
    ce = option_token(E1, 26100.0, "CE")
    p.ingest(tick(ce, 110.0, bid=109.95, ask=110.1, bid_qty=75, ask_qty=300, volume=12345,
                  oi=67890, close=100.0), is_mock=False, received_epoch_s=NOW_S)
    snap = snapshots(p.flush(NOW_S))[ce]
    assert tuple(snap) == schema.SNAPSHOT_FIELDS
    assert snap["v"] == schema.SCHEMA_VERSION == 1
    assert (snap["token"], snap["kind"], snap["name"], snap["expiry"], snap["strike"]) == (
        ce, "CE", "NIFTY", "2026-11-24", 26100.0,
    )
    assert (snap["ltp"], snap["change"], snap["bid"], snap["ask"]) == (110.0, 10.0, 109.95, 110.1)
    assert (snap["bid_qty"], snap["ask_qty"], snap["volume"], snap["oi"]) == (75, 300, 12345, 67890)
    assert snap["forward"] == FORWARD[E1]
    assert snap["underlying"] == SPOT
    assert snap["exchange_ts"] == int(NOW_S) * 1000
    assert snap["is_mock"] is False
    assert snap["flags"] == []
    expected = compute_greeks(
        price=110.0, forward=FORWARD[E1], strike=26100.0, is_call=True, r=R,
        t_years=years_to_expiry(now_epoch_s=NOW_S, expiry_epoch_s=p.universe.chain_expiry_epoch_s[0]),
        pair_price=premium(E1, 26100.0, "PE"),
    )
    for name in ("iv", "delta", "gamma", "theta", "vega", "rho"):
        assert snap[name] == pytest.approx(float(getattr(expected, name)), rel=1e-5), name
    assert 0.05 < snap["iv"] < 0.5


def test_unknown_values_are_null_not_zero():
    p = make_pipeline()
    p.ingest(tick(NIFTY_INDEX, SPOT, length=28, close=0.0), is_mock=False, received_epoch_s=NOW_S)
    snap = snapshots(p.flush(NOW_S))[NIFTY_INDEX]
    assert snap["kind"] == "INDEX" and snap["ltp"] == SPOT
    for name in ("change", "bid", "ask", "bid_qty", "ask_qty", "volume", "oi", "iv", "delta",
                 "forward", "exchange_ts"):
        assert snap[name] is None, name
    assert snap["underlying"] == SPOT


def test_the_documentation_lists_exactly_the_schema_fields():
    text = DOC.read_text()
    documented = re.findall(r"^\| `([a-z_]+)` \|", text, flags=re.MULTILINE)
    assert tuple(documented[: len(schema.SNAPSHOT_FIELDS)]) == schema.SNAPSHOT_FIELDS
    assert tuple(documented[len(schema.SNAPSHOT_FIELDS):]) == schema.BAR_FIELDS
    assert f"SCHEMA_VERSION = {schema.SCHEMA_VERSION}" in text
    for group in ("chain.NIFTY.20261124", "und.NIFTY", "bars.NIFTY", schema.SNAPSHOT_REQUESTS_GROUP):
        assert group in text
    # The example in the document is a snapshot the code could have written.
    example = re.search(r"```json\n(\{.*?\})\n```", text, flags=re.DOTALL).group(1)
    assert tuple(orjson.loads(example)) == schema.SNAPSHOT_FIELDS


def test_group_names_are_sanitised_and_bounded():
    assert schema.chain_group("NIFTY", E1) == "chain.NIFTY.20261124"
    assert schema.underlying_group("M&M") == "und.M_M"
    assert schema.underlying_group("bajaj-auto") == "und.BAJAJ-AUTO"
    assert schema.bars_group("NIFTY 50") == "bars.NIFTY_50"
    with pytest.raises(ValueError, match="too long"):
        schema.underlying_group("X" * 120)
    with pytest.raises(ValueError, match="empty"):
        schema.underlying_group(" ")


def test_snapshot_requests_are_validated():
    message = schema.snapshot_request_message(reply_to="specific.abc!def", tokens=[1, 2])
    assert schema.parse_snapshot_request(message).tokens == [1, 2]
    with pytest.raises(schema.SnapshotRequestError, match="reply_to"):
        schema.parse_snapshot_request({"type": "snapshot.request", "tokens": [1]})
    with pytest.raises(schema.SnapshotRequestError, match="tokens"):
        schema.parse_snapshot_request({"type": "snapshot.request", "reply_to": "x", "tokens": ["a"]})


def test_encode_snapshots_refuses_columns_of_different_lengths():
    one = np.ones(1)
    with pytest.raises(ValueError, match="differ in length"):
        schema.encode_snapshots(
            prefixes=[b"{"], ltp=np.ones(2), change=one, bid=one, ask=one, bid_qty=one,
            ask_qty=one, volume=one, oi=one, iv=one, delta=one, gamma=one, theta=one, vega=one,
            rho=one, forward=one, underlying=one, flags=[b',"flags":[]'], exchange_ts=one,
            is_mock=np.zeros(1, bool),
        )


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0.000993797123, 0.000993797), (-12.3456789, -12.3457), (1234567.891, 1234570.0),
     (0.5, 0.5), (1e-30, 1e-30), (123.456e-25, 1.23456e-23)],
)
def test_greeks_are_written_to_six_significant_digits(value, expected):
    out = schema._round_significant(np.array([value]), schema.GREEKS_SIGNIFICANT_DIGITS)
    assert orjson.loads(orjson.dumps(out, option=orjson.OPT_SERIALIZE_NUMPY)) == [expected]


# --- batching and computing once ------------------------------------------------------------


def test_one_batch_per_group_holding_each_changed_instrument_once():
    p = make_pipeline()
    full_market(p)
    batches = p.flush(NOW_S)
    groups = [b.group for b in batches]
    assert sorted(groups) == sorted(set(groups)) == sorted(p.universe.group_names)
    for batch in batches:
        assert {p.universe.group_of(t) for t in batch.tokens} == {batch.group}
        message = batch.message()
        assert message == {"type": "snapshots.batch", "group": batch.group,
                           "tokens": batch.tokens, "items": batch.items}
    assert set(snapshots(batches)) == set(p.universe.tokens.tolist())
    assert p.last_flush.groups == len(batches)
    # Nothing changed: nothing to send.
    assert p.flush(NOW_S + 0.1) == []


def test_an_instrument_streamed_by_two_accounts_is_computed_and_published_once():
    p = make_pipeline()
    frame = ticks(tick(NIFTY_FUT, FORWARD[E1]), chain_ticks(E1))
    p.ingest(frame, is_mock=False, received_epoch_s=NOW_S)  # account 1
    p.ingest(frame, is_mock=False, received_epoch_s=NOW_S + 0.01)  # account 2
    batches = p.flush(NOW_S + 0.05)
    published = snapshots(batches)
    assert len(published) == len(frame) == len(set(frame["instrument_token"].tolist()))
    assert p.last_flush.greeks == 6  # the six E1 options, once
    # Account 2's copy of the next tick lands after the flush: no second snapshot.
    moved = tick(option_token(E1, 26000.0, "CE"), premium(E1, 26000.0, "CE") + 1.0)
    p.ingest(moved, is_mock=False, received_epoch_s=NOW_S + 0.1)
    assert set(snapshots(p.flush(NOW_S + 0.15))) >= {option_token(E1, 26000.0, "CE")}
    p.ingest(moved, is_mock=False, received_epoch_s=NOW_S + 0.16)
    assert p.flush(NOW_S + 0.2) == []


def test_unknown_tokens_are_counted_and_dropped():
    p = make_pipeline()
    result = p.ingest(ticks(tick(12345, 1.0), tick(NIFTY_FUT, 26050.0)), is_mock=False)
    assert (result.ticks, result.unknown, result.changed) == (2, 1, 1)
    assert p.pending == 1


# --- forwards -------------------------------------------------------------------------------


def test_the_forward_is_the_same_expiry_future_else_put_call_parity():
    p = make_pipeline()
    full_market(p)
    published = snapshots(p.flush(NOW_S))
    assert p.forward_of("NIFTY", E1) == (FORWARD[E1], "future", False)
    forward, source, stale = p.forward_of("NIFTY", E2)
    assert (source, stale) == ("parity", False)
    calls = [premium(E2, k, "CE") for k in STRIKES]
    puts = [premium(E2, k, "PE") for k in STRIKES]
    t = float(years_to_expiry(now_epoch_s=NOW_S, expiry_epoch_s=p.universe.chain_expiry_epoch_s[1]))
    assert forward == forward_from_parity(strikes=STRIKES, call_prices=calls, put_prices=puts, t_years=t, r=R)
    assert forward == pytest.approx(FORWARD[E2], abs=0.2)
    assert published[option_token(E2, 26000.0, "PE")]["forward"] == round(forward, 4)
    assert published[option_token(E1, 26000.0, "PE")]["forward"] == FORWARD[E1]


def test_a_stale_future_gives_way_to_fresh_parity():
    p = make_pipeline()
    full_market(p)
    p.flush(NOW_S)
    later = NOW_S + 31.0
    p.ingest(chain_ticks(E1, forward=26060.0, now=later), is_mock=False, received_epoch_s=later)
    published = snapshots(p.flush(later))
    forward, source, stale = p.forward_of("NIFTY", E1)
    assert (source, stale) == ("parity", False)
    assert forward == pytest.approx(26060.0, abs=0.2)
    assert all(published[option_token(E1, k, kind)]["flags"] in ([], ["pair_iv"])
               for k in STRIKES for kind in ("CE", "PE"))


def test_a_stale_forward_is_flagged_on_the_options_it_prices():
    # A future and a lone call: no parity, so the future is the forward even when stale.
    ce = option_token(E1, 26000.0, "CE")
    p = make_pipeline()
    p.ingest(ticks(tick(NIFTY_FUT, FORWARD[E1]), tick(ce, premium(E1, 26000.0, "CE"))),
             is_mock=False, received_epoch_s=NOW_S)
    assert snapshots(p.flush(NOW_S))[ce]["flags"] == []
    later = NOW_S + 40.0
    p.ingest(tick(ce, premium(E1, 26000.0, "CE") + 0.5, ts=int(later)), is_mock=False,
             received_epoch_s=later)
    snap = snapshots(p.flush(later))[ce]
    assert p.forward_of("NIFTY", E1) == (FORWARD[E1], "future", True)
    assert "stale_underlying" in snap["flags"]
    assert snap["iv"] is None and snap["delta"] is None
    assert snap["forward"] == FORWARD[E1]


def test_without_future_or_parity_options_say_no_forward():
    p = make_pipeline()
    p.ingest(chain_ticks(E2, kinds=("CE",)), is_mock=False, received_epoch_s=NOW_S)
    published = snapshots(p.flush(NOW_S))
    for k in STRIKES:
        snap = published[option_token(E2, k, "CE")]
        assert snap["flags"] == ["no_forward"]
        assert snap["forward"] is None and snap["iv"] is None
    assert p.forward_of("NIFTY", E2)[1] == "none"


# --- mock and live --------------------------------------------------------------------------


def test_mock_and_live_data_never_mix():
    p = make_pipeline()
    # Live index and future; mock options on E1.
    p.ingest(ticks(tick(NIFTY_INDEX, SPOT, length=32), tick(NIFTY_FUT, FORWARD[E1])),
             is_mock=False, received_epoch_s=NOW_S)
    p.ingest(chain_ticks(E1), is_mock=True, received_epoch_s=NOW_S)
    published = snapshots(p.flush(NOW_S))
    ce = option_token(E1, 26100.0, "CE")  # out of the money
    assert published[ce]["is_mock"] is True
    assert published[ce]["forward"] is None and published[ce]["underlying"] is None
    assert published[ce]["flags"] == ["no_forward"]
    assert published[NIFTY_FUT]["is_mock"] is False
    # The mock market takes over the future and the index too: now everything is mock.
    p.ingest(ticks(tick(NIFTY_INDEX, SPOT + 1, length=32), tick(NIFTY_FUT, FORWARD[E1] + 1)),
             is_mock=True, received_epoch_s=NOW_S + 0.1)
    published = snapshots(p.flush(NOW_S + 1.5))
    assert published[ce]["is_mock"] is True
    assert published[ce]["forward"] == FORWARD[E1] + 1
    assert published[ce]["underlying"] == SPOT + 1
    assert published[ce]["flags"] == []
    assert published[NIFTY_FUT]["is_mock"] is True


def test_a_live_tick_after_mock_starts_from_nothing():
    p = make_pipeline()
    ce = option_token(E1, 26000.0, "CE")
    p.ingest(tick(ce, 50.0, volume=999, oi=888), is_mock=True, received_epoch_s=NOW_S)
    p.flush(NOW_S)
    p.ingest(tick(ce, 51.0, length=8), is_mock=False, received_epoch_s=NOW_S + 1)
    snap = snapshots(p.flush(NOW_S + 1))[ce]
    assert (snap["is_mock"], snap["ltp"], snap["volume"], snap["oi"]) == (False, 51.0, None, None)


# --- what gets recomputed -------------------------------------------------------------------


def test_an_otm_tick_republishes_its_itm_pair_and_an_itm_tick_only_itself():
    p = make_pipeline()
    full_market(p)
    p.flush(NOW_S)
    # F = 26050: the 25900 put is OTM, its call ITM.
    otm_put = option_token(E1, 25900.0, "PE")
    itm_call = option_token(E1, 25900.0, "CE")
    p.ingest(tick(otm_put, premium(E1, 25900.0, "PE") + 2.0), is_mock=False, received_epoch_s=NOW_S + 0.1)
    published = snapshots(p.flush(NOW_S + 0.1))
    assert set(published) == {otm_put, itm_call}
    assert published[itm_call]["flags"] == ["pair_iv"]
    assert published[itm_call]["iv"] == published[otm_put]["iv"]
    p.ingest(tick(itm_call, premium(E1, 25900.0, "CE") + 2.0), is_mock=False, received_epoch_s=NOW_S + 0.2)
    assert set(snapshots(p.flush(NOW_S + 0.2))) == {itm_call}


def test_a_moving_future_refreshes_its_chain_at_most_once_per_interval():
    p = make_pipeline(chain_refresh_interval_s=1.0)
    full_market(p)
    p.flush(NOW_S)
    e1_options = {option_token(E1, k, kind) for k in STRIKES for kind in ("CE", "PE")}
    p.ingest(tick(NIFTY_FUT, FORWARD[E1] + 5), is_mock=False, received_epoch_s=NOW_S + 0.1)
    # The chain was computed at NOW_S: only the future itself goes out now.
    assert set(snapshots(p.flush(NOW_S + 0.1))) == {NIFTY_FUT}
    assert p.flush(NOW_S + 0.5) == []
    published = snapshots(p.flush(NOW_S + 1.05))
    assert set(published) == e1_options
    assert {s["forward"] for s in published.values()} == {FORWARD[E1] + 5}
    # Once refreshed, nothing is pending.
    assert p.flush(NOW_S + 2.5) == []


def test_chain_refreshes_spread_over_the_interval():
    """Twenty chains whose futures all move every flush refresh once a second each, a few per
    flush, not all twenty on one flush."""
    from tests.streaming.engine.builders import future_row, option_row

    names = [f"UND{i:02d}" for i in range(20)]
    rows, futures = [], {}
    for i, name in enumerate(names):
        futures[name] = (20_000 + i) * 256 + 2
        rows.append(future_row(token=futures[name], name=name))
        for j, strike in enumerate(STRIKES):
            for k, kind in enumerate(("CE", "PE")):
                rows.append(option_row(E1, strike, kind, name=name, token=(30_000 + i * 10 + j * 2 + k) * 256 + 2))
    p = make_pipeline(rows, chain_refresh_interval_s=1.0)
    u = p.universe
    start = NOW_S + 0.05
    p.ingest(ticks(*(tick(int(t), 50.0 + (t % 7)) for t in u.tokens[u.is_option])), is_mock=False,
             received_epoch_s=start)
    p.ingest(ticks(*(tick(t, FORWARD[E1]) for t in futures.values())), is_mock=False, received_epoch_s=start)
    p.flush(start)
    refreshed_per_flush = []
    refreshed = set()
    for step in range(1, 11):
        now = start + 0.1 * step
        p.ingest(ticks(*(tick(t, FORWARD[E1] + step) for t in futures.values())), is_mock=False,
                 received_epoch_s=now)
        published = snapshots(p.flush(now))
        chains = {s["name"] for s in published.values() if s["kind"] != "FUT"}
        assert not chains & refreshed, "a chain refreshed twice within the interval"
        refreshed |= chains
        refreshed_per_flush.append(len(chains))
    assert refreshed == set(names)
    assert max(refreshed_per_flush) <= 4, refreshed_per_flush


def test_the_stale_transition_alone_republishes_the_chain():
    p = make_pipeline()
    p.ingest(ticks(tick(NIFTY_FUT, FORWARD[E1]), chain_ticks(E1, kinds=("CE",))), is_mock=False,
             received_epoch_s=NOW_S)
    p.flush(NOW_S)
    published = snapshots(p.flush(NOW_S + 31.0))
    assert len(published) == 3
    assert all("stale_underlying" in s["flags"] for s in published.values())


def test_the_pipeline_tells_when_time_alone_will_make_a_forward_stale():
    """An idle engine does not flush, so the pipeline names the moment a flush has work."""
    p = make_pipeline()
    p.ingest(ticks(tick(NIFTY_FUT, FORWARD[E1]), chain_ticks(E1, kinds=("CE",))), is_mock=False,
             received_epoch_s=NOW_S)
    p.flush(NOW_S)
    assert p.next_due_in(NOW_S + 1.0) == pytest.approx(29.0)
    assert all("stale_underlying" in s["flags"] for s in snapshots(p.flush(NOW_S + 31.0)).values())
    # Nothing fresh is left to go stale and no refresh waits: nothing is due.
    assert p.next_due_in(NOW_S + 31.0) is None


# --- watched groups, latest, reload ---------------------------------------------------------


def test_only_watched_groups_are_serialised_and_latest_serialises_the_rest_on_demand():
    p = make_pipeline()
    full_market(p)
    watched = frozenset({"und.NIFTY"})
    batches = p.flush(NOW_S, watched=watched)
    assert [b.group for b in batches] == ["und.NIFTY"]
    assert p.last_flush.snapshots == 2
    ce = option_token(E2, 26000.0, "CE")
    p.ingest(tick(ce, 77.0), is_mock=False, received_epoch_s=NOW_S + 0.1)
    assert p.flush(NOW_S + 0.1, watched=watched) == []
    tokens, items = p.latest([ce, 999, NIFTY_FUT])
    assert tokens == [ce, NIFTY_FUT]
    assert orjson.loads(items[0])["ltp"] == 77.0
    # The same bytes a watched flush would have written.
    p.ingest(tick(ce, 78.0), is_mock=False, received_epoch_s=NOW_S + 0.2)
    (batch,) = p.flush(NOW_S + 0.2, watched=frozenset({"chain.NIFTY.20261201"}))
    assert p.latest([ce]) == ([ce], [batch.items[batch.tokens.index(ce)]])


def test_latest_leaves_out_instruments_without_data():
    p = make_pipeline()
    p.ingest(tick(NIFTY_FUT, FORWARD[E1]), is_mock=False, received_epoch_s=NOW_S)
    assert p.latest([NIFTY_INDEX, NIFTY_FUT])[0] == [NIFTY_FUT]
    assert p.latest([]) == ([], [])


def test_set_universe_keeps_kept_instruments_untouched():
    p = make_pipeline()
    full_market(p)
    p.flush(NOW_S)
    kept = [NIFTY_INDEX, NIFTY_FUT, option_token(E1, 26000.0, "CE")]
    before = p.latest(kept)
    removed = option_token(E2, 26000.0, "CE")
    added = option_token(E1, 26200.0, "CE")
    from tests.streaming.engine.builders import option_row

    rows = [r for r in nifty_rows() if r["instrument_token"] != removed]
    rows.append(option_row(E1, 26200.0, "CE"))
    p.set_universe(InstrumentUniverse.from_rows(rows))
    assert p.latest(kept) == before
    assert p.pending == 0
    assert p.flush(NOW_S + 0.1) == []  # a reload publishes nothing by itself
    assert p.latest([removed, added]) == ([], [])
    result = p.ingest(ticks(tick(removed, 1.0), tick(added, 20.0)), is_mock=False, received_epoch_s=NOW_S + 0.2)
    assert result.unknown == 1
    published = snapshots(p.flush(NOW_S + 0.2))
    assert set(published) == {added}
    assert published[added]["forward"] == FORWARD[E1]
    # The E1 forward carried over: no chain refresh was triggered by the reload.
    assert p.forward_of("NIFTY", E1) == (FORWARD[E1], "future", False)


def test_underlying_summary_for_the_heartbeat():
    p = make_pipeline()
    full_market(p)
    p.flush(NOW_S)
    summary = p.underlying_summary()
    assert summary["NIFTY"]["price"] == SPOT
    assert summary["NIFTY"]["ts"] == int(NOW_S)
    forwards = summary["NIFTY"]["forwards"]
    assert forwards[E1.isoformat()] == FORWARD[E1]
    assert forwards[E2.isoformat()] == pytest.approx(FORWARD[E2], abs=0.2)


def test_settings_are_checked():
    u = InstrumentUniverse.empty()
    with pytest.raises(ValueError, match="stale_after_s"):
        SnapshotPipeline(u, r=R, stale_after_s=0)
    with pytest.raises(ValueError, match="r=nan"):
        SnapshotPipeline(u, r=math.nan, stale_after_s=30)
    assert SnapshotPipeline(u, r=R, stale_after_s=30).flush(NOW_S) == []


# --- against the synthetic market -----------------------------------------------------------


def test_ivs_reproduce_the_synthetic_markets_volatility():
    now = NOW_S
    market = SyntheticMarket(seed=7, now_fn=lambda: now, underlyings=("NIFTY",), strikes_each_side=10)
    market.step(now + 60.0)
    p = SnapshotPipeline(market_universe(market), r=0.065, stale_after_s=30.0)
    ticks_all = market.ticks(market.tokens)
    p.ingest(ticks_all, is_mock=True, received_epoch_s=now + 60.0)
    published = snapshots(p.flush(now + 60.0))
    assert len(published) == len(market.instruments)
    options = [s for s in published.values() if s["kind"] in ("CE", "PE")]
    sigma = dict(zip((s["token"] for s in options), market.sigma([s["token"] for s in options]), strict=True))
    checked = 0
    for snap in options:
        assert snap["is_mock"] is True
        if snap["iv"] is None:
            assert snap["flags"], snap  # a reason, never a silent null
            continue
        if snap["vega"] > 5.0:  # a 0.05 tick moves the IV by < 0.5 vol points
            assert snap["iv"] == pytest.approx(sigma[snap["token"]], abs=0.006), snap
            checked += 1
    assert checked >= len(options) // 3
    assert dt.date.fromisoformat(options[0]["expiry"]) in {d for d in p.universe.chain_expiry}


# --- the column-wise JSON writer against a plain dict, on drawn values ----------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

_FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.floats(min_value=-1e6, max_value=1e6),
    st.sampled_from([0.0, -0.0, 0.05, 1e-300, -1.0]),
)
_INTS = st.one_of(st.integers(min_value=-5, max_value=2**40), st.sampled_from([-1, 0, 1]))


@settings(max_examples=60, deadline=None)
@given(data=st.data(), n=st.integers(min_value=1, max_value=12))
def test_encoded_snapshots_parse_to_the_rounded_columns(data, n):
    floats = {
        name: data.draw(hnp.arrays(np.float64, n, elements=_FLOATS))
        for name in ("ltp", "change", "bid", "ask", "iv", "delta", "gamma", "theta", "vega",
                     "rho", "forward", "underlying")
    }
    ints = {name: data.draw(hnp.arrays(np.int64, n, elements=_INTS))
            for name in ("bid_qty", "ask_qty", "volume", "oi", "exchange_ts")}
    flags = data.draw(st.lists(st.sampled_from([[], ["no_price"], ["stale_underlying", "pair_iv"]]),
                               min_size=n, max_size=n))
    is_mock = data.draw(hnp.arrays(np.bool_, n))
    prefixes = [
        schema.snapshot_prefix(token=i, symbol=f'S"{i}', exchange="NFO", name="N", kind="CE",
                               expiry=E1, strike=100.0 + i)
        for i in range(n)
    ]
    items = schema.encode_snapshots(
        prefixes=prefixes, **floats, **ints, flags=[schema.flags_piece(f) for f in flags],
        is_mock=is_mock,
    )
    assert len(items) == n

    def expected_float(name, value):
        if not math.isfinite(value):
            return None
        if name in ("iv", "delta", "gamma", "theta", "vega", "rho"):
            return float(schema._round_significant(np.array([value]), 6)[0])
        if name == "change":
            return float(schema._round_decimals(np.array([value]), 2)[0])
        if name in ("forward", "underlying"):
            return float(schema._round_decimals(np.array([value]), 4)[0])
        return value

    for i, item in enumerate(items):
        snap = orjson.loads(item)
        assert tuple(snap) == schema.SNAPSHOT_FIELDS
        assert (snap["token"], snap["symbol"], snap["strike"]) == (i, f'S"{i}', 100.0 + i)
        for name, column in floats.items():
            assert snap[name] == expected_float(name, float(column[i])), (name, column[i])
        for name, column in ints.items():
            assert snap[name] == (int(column[i]) if column[i] >= 0 else None), name
        assert snap["flags"] == flags[i]
        assert snap["is_mock"] is bool(is_mock[i])
