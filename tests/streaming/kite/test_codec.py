"""The tick codec against kiteconnect's own parser, Kite's golden packets, and its encoder."""

from __future__ import annotations

import base64
import json
import os
import struct
import time
from datetime import datetime

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kiteconnect import KiteTicker

from streaming.kite.codec import (
    PACKET_FULL,
    PACKET_INDEX_FULL,
    PACKET_INDEX_QUOTE,
    PACKET_LENGTHS,
    PACKET_LTP,
    PACKET_MODE,
    PACKET_QUOTE,
    TICK_DTYPE,
    TickEncodeError,
    decode_frame,
    empty_ticks,
    encode_frame,
    price_divisors,
)
from tests.fixtures import KITE_MOCKS

SEGMENTS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 0, 255)
QUOTE_FIELDS = (
    "last_traded_quantity",
    "average_traded_price",
    "volume_traded",
    "total_buy_quantity",
    "total_sell_quantity",
)
FULL_FIELDS = ("oi", "oi_day_high", "oi_day_low")
DEPTH_FIELDS = tuple(
    f"depth_{side}_{part}" for side in ("buy", "sell") for part in ("quantity", "price", "orders")
)


@pytest.fixture(autouse=True)
def pinned_timezone():
    """kiteconnect turns timestamps into naive local datetimes: pin the zone Kite users run in."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "Asia/Kolkata"
    time.tzset()
    yield
    if before is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = before
    time.tzset()


@pytest.fixture(scope="module")
def reference() -> KiteTicker:
    """kiteconnect's ticker, built but never connected: only its parser is used."""
    return KiteTicker("api_key", "access_token")


def frame_of(packets: list[bytes]) -> bytes:
    """Wrap bare packets in Kite's frame: count, then length-prefixed packets."""
    body = b"".join(struct.pack(">H", len(p)) + p for p in packets)
    return struct.pack(">H", len(packets)) + body


def golden_packet(name: str) -> bytes:
    return base64.b64decode((KITE_MOCKS / name).read_text())


def assert_tick_equals_reference(row: np.void, ref: dict) -> None:
    """Field-by-field equality with one dict from KiteTicker._parse_binary, plus zeros elsewhere."""
    length = int(row["packet_length"])
    assert ref["mode"] == PACKET_MODE[length]
    assert int(row["instrument_token"]) == ref["instrument_token"]
    assert bool(row["tradable"]) is ref["tradable"]
    assert bool(row["is_index"]) is (not ref["tradable"])
    assert row["last_price"] == ref["last_price"]
    expected_keys = {"tradable", "mode", "instrument_token", "last_price"}
    if length == PACKET_LTP:
        for name in ("open", "high", "low", "close", "change", "exchange_timestamp"):
            assert row[name] == 0, name
    else:
        expected_keys |= {"ohlc", "change"}
        for name in ("open", "high", "low", "close"):
            assert row[name] == ref["ohlc"][name], name
        assert row["change"] == ref["change"]
    if length in (PACKET_INDEX_QUOTE, PACKET_INDEX_FULL, PACKET_LTP):
        for name in QUOTE_FIELDS:
            assert row[name] == 0, name
    else:
        expected_keys |= set(QUOTE_FIELDS)
        for name in QUOTE_FIELDS:
            assert row[name] == ref[name], name
    if length in (PACKET_INDEX_FULL, PACKET_FULL):
        expected_keys.add("exchange_timestamp")
        assert datetime.fromtimestamp(int(row["exchange_timestamp"])) == ref["exchange_timestamp"]
    elif length != PACKET_LTP:
        assert row["exchange_timestamp"] == 0
    if length == PACKET_FULL:
        expected_keys |= {"last_trade_time", "depth", *FULL_FIELDS}
        assert datetime.fromtimestamp(int(row["last_trade_time"])) == ref["last_trade_time"]
        for name in FULL_FIELDS:
            assert row[name] == ref[name], name
        for side in ("buy", "sell"):
            assert len(ref["depth"][side]) == 5
            for level, entry in enumerate(ref["depth"][side]):
                for part in ("quantity", "price", "orders"):
                    assert row[f"depth_{side}_{part}"][level] == entry[part], (side, level, part)
    else:
        for name in ("last_trade_time", *FULL_FIELDS, *DEPTH_FIELDS):
            assert np.all(row[name] == 0), name
    assert set(ref) == expected_keys


def assert_frame_equals_reference(frame: bytes, reference: KiteTicker) -> np.ndarray:
    decoded = decode_frame(frame)
    expected = reference._parse_binary(frame)
    assert decoded.malformed == 0, decoded.malformed_reasons
    assert not decoded.heartbeat
    assert decoded.ticks.dtype == TICK_DTYPE
    assert len(decoded.ticks) == len(expected)
    for row, ref in zip(decoded.ticks, expected, strict=True):
        assert_tick_equals_reference(row, ref)
    return decoded.ticks


def random_packet(rng: np.random.Generator, length: int) -> bytes:
    """A packet of random bytes with a token from a chosen segment; some closes forced to 0."""
    body = bytearray(rng.integers(0, 256, size=length, dtype=np.uint8).tobytes())
    body[3] = int(rng.choice(SEGMENTS))
    if length > PACKET_LTP and rng.random() < 0.2:
        close_at = 20 if length in (PACKET_INDEX_QUOTE, PACKET_INDEX_FULL) else 40
        body[close_at : close_at + 4] = b"\x00\x00\x00\x00"
    return bytes(body)


# --- equality with kiteconnect ------------------------------------------------------------


@pytest.mark.parametrize("length", PACKET_LENGTHS)
def test_random_frames_of_each_kind_equal_reference(reference, length):
    rng = np.random.default_rng(length)
    for count in (1, 2, 17, 300):
        frame = frame_of([random_packet(rng, length) for _ in range(count)])
        ticks = assert_frame_equals_reference(frame, reference)
        assert (ticks["packet_length"] == length).all()


def test_random_mixed_frames_equal_reference(reference):
    rng = np.random.default_rng(7)
    for _ in range(5):
        lengths = rng.choice(PACKET_LENGTHS, size=1000)
        frame = frame_of([random_packet(rng, int(n)) for n in lengths])
        ticks = assert_frame_equals_reference(frame, reference)
        assert ticks["packet_length"].tolist() == lengths.tolist()


def test_every_segment_divisor_matches_reference(reference):
    packets = []
    for segment in range(256):
        body = bytearray(random_packet(np.random.default_rng(segment), PACKET_FULL))
        body[3] = segment
        packets.append(bytes(body))
    ticks = assert_frame_equals_reference(frame_of(packets), reference)
    assert (ticks["is_index"] == (np.arange(256) == 9)).all()


packet_strategy = st.sampled_from(PACKET_LENGTHS).flatmap(
    lambda n: st.binary(min_size=n, max_size=n)
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(packet_strategy, min_size=1, max_size=12))
def test_property_well_formed_frames_equal_reference(reference, packets):
    assert_frame_equals_reference(frame_of(packets), reference)


def test_golden_full_packet(reference):
    frame = frame_of([golden_packet("ticker_full.packet")])
    tick = assert_frame_equals_reference(frame, reference)[0]
    golden = json.loads((KITE_MOCKS / "ticker_full.json").read_text())
    assert tick["packet_length"] == PACKET_FULL
    assert tick["instrument_token"] == golden["instrument_token"] == 408065
    assert tick["last_price"] == golden["last_price"]
    assert tick["last_traded_quantity"] == golden["last_quantity"]
    assert tick["average_traded_price"] == golden["average_price"]
    assert tick["volume_traded"] == golden["volume"]
    assert tick["total_buy_quantity"] == golden["buy_quantity"]
    assert tick["total_sell_quantity"] == golden["sell_quantity"]
    for name in ("open", "high", "low", "close"):
        assert tick[name] == golden["ohlc"][name]
    # The Go client (which wrote the JSON) reports change as absolute; we report a percentage.
    assert tick["last_price"] - tick["close"] == pytest.approx(golden["change"])
    assert tick["change"] == pytest.approx(golden["change"] * 100 / golden["ohlc"]["close"])
    assert tick["last_trade_time"] == datetime.fromisoformat(golden["last_trade_time"]).timestamp()
    assert tick["exchange_timestamp"] == datetime.fromisoformat(golden["timestamp"]).timestamp()
    for side in ("buy", "sell"):
        for level, entry in enumerate(golden["depth"][side]):
            assert tick[f"depth_{side}_price"][level] == entry["price"]
            assert tick[f"depth_{side}_quantity"][level] == entry["quantity"]
            assert tick[f"depth_{side}_orders"][level] == entry["orders"]


def test_golden_quote_packet(reference):
    frame = frame_of([golden_packet("ticker_quote.packet")])
    tick = assert_frame_equals_reference(frame, reference)[0]
    golden = json.loads((KITE_MOCKS / "ticker_quote.json").read_text())
    assert tick["packet_length"] == PACKET_QUOTE
    assert tick["instrument_token"] == golden["instrument_token"]
    assert tick["last_price"] == golden["last_price"]
    assert tick["volume_traded"] == golden["volume"]
    for name in ("open", "high", "low", "close"):
        assert tick[name] == golden["ohlc"][name]


def test_golden_packets_together_in_one_frame(reference):
    frame = frame_of([golden_packet("ticker_full.packet"), golden_packet("ticker_quote.packet")])
    ticks = assert_frame_equals_reference(frame, reference)
    assert ticks["packet_length"].tolist() == [PACKET_FULL, PACKET_QUOTE]


# --- encoder ------------------------------------------------------------------------------


def random_ticks(rng: np.random.Generator, lengths: np.ndarray) -> np.ndarray:
    """Ticks whose values are exactly representable on the wire (integer wire units)."""
    n = len(lengths)
    ticks = empty_ticks(n)
    segments = rng.choice(SEGMENTS[:10], size=n)
    ticks["instrument_token"] = (rng.integers(1, 1 << 24, size=n) << 8) | segments
    ticks["packet_length"] = lengths
    divisors = price_divisors(ticks["instrument_token"])
    u32 = 1 << 32
    for name in ("last_price", "average_traded_price", "open", "high", "low", "close"):
        ticks[name] = rng.integers(0, u32, size=n) / divisors
    for name in (*QUOTE_FIELDS[0:1], *QUOTE_FIELDS[2:], *FULL_FIELDS):
        ticks[name] = rng.integers(0, u32, size=n)
    ticks["last_trade_time"] = rng.integers(0, u32, size=n)
    ticks["exchange_timestamp"] = rng.integers(0, u32, size=n)
    for side in ("buy", "sell"):
        ticks[f"depth_{side}_quantity"] = rng.integers(0, u32, size=(n, 5))
        ticks[f"depth_{side}_price"] = rng.integers(0, u32, size=(n, 5)) / divisors[:, None]
        ticks[f"depth_{side}_orders"] = rng.integers(0, 1 << 16, size=(n, 5))
    return ticks


def expected_after_decode(ticks: np.ndarray) -> np.ndarray:
    """What the decoder should give back: only the fields each packet kind carries, and
    tradable/is_index/change derived as kiteconnect does."""
    out = ticks.copy()
    lengths = out["packet_length"]
    segment = out["instrument_token"] & 0xFF
    out["is_index"] = segment == 9
    out["tradable"] = segment != 9
    ltp = lengths == PACKET_LTP
    index = np.isin(lengths, (PACKET_INDEX_QUOTE, PACKET_INDEX_FULL))
    for name in ("open", "high", "low", "close"):
        out[name][ltp] = 0
    for name in QUOTE_FIELDS:
        out[name][ltp | index] = 0
    out["exchange_timestamp"][np.isin(lengths, (PACKET_LTP, PACKET_INDEX_QUOTE, PACKET_QUOTE))] = 0
    not_full = lengths != PACKET_FULL
    for name in ("last_trade_time", *FULL_FIELDS, *DEPTH_FIELDS):
        out[name][not_full] = 0
    with np.errstate(divide="ignore", invalid="ignore"):
        change = (out["last_price"] - out["close"]) * 100 / out["close"]
    out["change"] = np.where(out["close"] != 0, change, 0.0)
    out["change"][ltp] = 0
    return out


@pytest.mark.parametrize("length", PACKET_LENGTHS)
def test_encode_then_decode_round_trips_each_kind(reference, length):
    ticks = random_ticks(np.random.default_rng(length), np.full(500, length))
    frame = encode_frame(ticks)
    decoded = assert_frame_equals_reference(frame, reference)
    np.testing.assert_array_equal(decoded, expected_after_decode(ticks))


def test_encode_then_decode_round_trips_mixed(reference):
    rng = np.random.default_rng(11)
    ticks = random_ticks(rng, rng.choice(PACKET_LENGTHS, size=2000))
    frame = encode_frame(ticks)
    decoded = assert_frame_equals_reference(frame, reference)
    np.testing.assert_array_equal(decoded, expected_after_decode(ticks))


def test_encode_reproduces_golden_bytes():
    for packets in (
        [golden_packet("ticker_full.packet")],
        [golden_packet("ticker_quote.packet")],
        [golden_packet("ticker_quote.packet"), golden_packet("ticker_full.packet")],
    ):
        frame = frame_of(packets)
        assert encode_frame(decode_frame(frame).ticks) == frame


def test_encode_writes_index_change_as_absolute_wire_units():
    ticks = empty_ticks(1)
    ticks["instrument_token"] = 256265  # NIFTY 50, segment 9
    ticks["packet_length"] = PACKET_INDEX_FULL
    ticks["last_price"], ticks["close"] = 24_010.5, 24_000.0
    frame = encode_frame(ticks)
    (change,) = struct.unpack(">i", frame[4 + 24 : 4 + 28])
    assert change == 1050


def test_encode_empty_frame():
    assert encode_frame(empty_ticks(0)) == b"\x00\x00"
    decoded = decode_frame(b"\x00\x00")
    assert len(decoded.ticks) == 0
    assert decoded.malformed == 0


def test_encode_rejects_values_the_wire_cannot_hold():
    ticks = empty_ticks(3)
    ticks["instrument_token"] = 408065
    ticks["packet_length"] = PACKET_FULL
    ticks["last_price"][2] = -1.0
    with pytest.raises(TickEncodeError) as caught:
        encode_frame(ticks)
    assert (caught.value.field, caught.value.row) == ("last_price", 2)

    ticks["last_price"][2] = 1.0
    ticks["depth_sell_orders"][1, 3] = 1 << 16
    with pytest.raises(TickEncodeError) as caught:
        encode_frame(ticks)
    assert (caught.value.field, caught.value.row) == ("depth_sell_orders", 1)

    ticks["depth_sell_orders"][1, 3] = 0
    ticks["volume_traded"][0] = 1 << 32
    with pytest.raises(TickEncodeError, match="volume_traded"):
        encode_frame(ticks)

    ticks["volume_traded"][0] = 0
    ticks["close"][1] = np.nan
    with pytest.raises(TickEncodeError, match="finite"):
        encode_frame(ticks)


def test_encode_rejects_unknown_packet_length_and_wrong_dtype():
    ticks = empty_ticks(2)
    ticks["packet_length"] = (PACKET_LTP, 30)
    with pytest.raises(TickEncodeError) as caught:
        encode_frame(ticks)
    assert (caught.value.field, caught.value.row, caught.value.got) == ("packet_length", 1, 30)
    with pytest.raises(TypeError, match="TICK_DTYPE"):
        encode_frame(np.zeros(2, dtype=[("instrument_token", "u4")]))
    with pytest.raises(TickEncodeError, match="65535"):
        encode_frame(empty_ticks(70_000))
