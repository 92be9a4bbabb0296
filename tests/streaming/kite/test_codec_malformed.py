"""Malformed binary input: counted and skipped, good packets kept, never an exception."""

from __future__ import annotations

import struct

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streaming.kite.codec import (
    MALFORMED_REASONS,
    PACKET_FULL,
    PACKET_LENGTHS,
    PACKET_LTP,
    PACKET_QUOTE,
    TICK_DTYPE,
    decode_frame,
    empty_ticks,
    encode_frame,
)


def ticks_of(lengths: list[int]) -> np.ndarray:
    ticks = empty_ticks(len(lengths))
    ticks["packet_length"] = lengths
    ticks["instrument_token"] = np.arange(len(lengths)) * 256 + 408065
    ticks["last_price"] = 100.0 + np.arange(len(lengths))
    ticks["close"] = 99.0
    return ticks


def packet_at(frame: bytes, index: int) -> tuple[int, int]:
    """(offset of the length prefix, packet length) of packet ``index`` in a frame."""
    j = 2
    for _ in range(index):
        j += 2 + struct.unpack_from(">H", frame, j)[0]
    return j, struct.unpack_from(">H", frame, j)[0]


def test_heartbeat_is_one_byte():
    decoded = decode_frame(b"\x00")
    assert decoded.heartbeat
    assert len(decoded.ticks) == 0
    assert decoded.ticks.dtype == TICK_DTYPE
    assert decoded.malformed == 0


def test_empty_message_is_counted():
    decoded = decode_frame(b"")
    assert not decoded.heartbeat
    assert decoded.malformed == 1
    assert decoded.malformed_reasons == ("empty_frame",)


def test_truncated_frame_keeps_whole_packets_before_the_cut():
    frame = encode_frame(ticks_of([PACKET_FULL, PACKET_QUOTE, PACKET_FULL]))
    start, _ = packet_at(frame, 2)
    for cut in range(start + 3, len(frame)):  # inside the third packet's body
        decoded = decode_frame(frame[:cut])
        assert decoded.ticks["instrument_token"].tolist() == [408065, 408321]
        assert decoded.malformed_reasons == ("truncated_packet",)


def test_frame_cut_before_a_length_prefix_counts_the_missing_packets():
    frame = encode_frame(ticks_of([PACKET_LTP, PACKET_QUOTE, PACKET_LTP]))
    start, _ = packet_at(frame, 2)
    decoded = decode_frame(frame[:start])
    assert len(decoded.ticks) == 2
    assert decoded.malformed_reasons == ("count_exceeds_frame",)


def test_count_larger_than_the_frame():
    frame = bytearray(encode_frame(ticks_of([PACKET_QUOTE, PACKET_QUOTE])))
    frame[0:2] = struct.pack(">H", 40_000)
    decoded = decode_frame(bytes(frame))
    assert len(decoded.ticks) == 2
    assert decoded.malformed == 1
    assert decoded.malformed_reasons == ("count_exceeds_frame",)


def test_unknown_packet_length_is_skipped_and_later_packets_kept():
    good = encode_frame(ticks_of([PACKET_LTP]))[4:]  # one bare 8-byte packet
    odd = b"\x01" * 30
    frame = struct.pack(">H", 3)
    for body in (good, odd, good):
        frame += struct.pack(">H", len(body)) + body
    decoded = decode_frame(frame)
    assert decoded.ticks["packet_length"].tolist() == [PACKET_LTP, PACKET_LTP]
    assert decoded.malformed_reasons == ("unknown_packet_length",)


def test_zero_length_packet_is_skipped_and_later_packets_kept():
    good = encode_frame(ticks_of([PACKET_QUOTE]))[4:]
    frame = struct.pack(">H", 3) + struct.pack(">H", 44) + good + b"\x00\x00"
    frame += struct.pack(">H", 44) + good
    decoded = decode_frame(frame)
    assert len(decoded.ticks) == 2
    assert decoded.malformed_reasons == ("zero_length_packet",)


def test_trailing_bytes_are_counted_and_packets_kept():
    frame = encode_frame(ticks_of([PACKET_FULL])) + b"\xff\xff\xff"
    decoded = decode_frame(frame)
    assert len(decoded.ticks) == 1
    assert decoded.malformed_reasons == ("trailing_bytes",)


def test_several_faults_in_one_frame_are_each_counted():
    good = encode_frame(ticks_of([PACKET_LTP]))[4:]
    frame = struct.pack(">H", 5)
    frame += b"\x00\x00" + struct.pack(">H", 9) + b"x" * 9 + struct.pack(">H", 8) + good
    frame += struct.pack(">H", 184) + b"short"
    decoded = decode_frame(frame)
    assert len(decoded.ticks) == 1
    assert decoded.malformed == 3
    assert decoded.malformed_reasons == (
        "truncated_packet",
        "unknown_packet_length",
        "zero_length_packet",
    )


# --- fuzzing ------------------------------------------------------------------------------


def check_invariants(data: bytes) -> None:
    decoded = decode_frame(data)
    assert decoded.ticks.dtype == TICK_DTYPE
    assert np.isin(decoded.ticks["packet_length"], PACKET_LENGTHS).all()
    assert decoded.malformed == len(decoded.malformed_reasons)
    assert set(decoded.malformed_reasons) <= set(MALFORMED_REASONS)
    assert decoded.heartbeat == (len(data) == 1)
    # Every decoded packet consumed its 2-byte prefix and body out of the frame.
    assert 2 + int(decoded.ticks["packet_length"].astype(np.int64).sum()) + 2 * len(
        decoded.ticks
    ) <= max(len(data), 2)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_fuzz_random_bytes_never_raise(data):
    check_invariants(data)


frame_like = st.lists(
    st.one_of(
        st.sampled_from(PACKET_LENGTHS),
        st.integers(min_value=0, max_value=300),
    ),
    max_size=8,
).flatmap(
    lambda lengths: st.tuples(
        st.integers(min_value=0, max_value=0xFFFF),
        st.just(lengths),
        st.lists(st.binary(min_size=0, max_size=200), min_size=len(lengths), max_size=len(lengths)),
        st.integers(min_value=0, max_value=2000),
    )
)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frame_like)
def test_fuzz_plausible_frames_never_raise_and_keep_good_prefix(spec):
    """Frames shaped like Kite's (lying counts, lying lengths, short bodies, random cuts)."""
    count, lengths, bodies, cut = spec
    frame = struct.pack(">H", count)
    for length, body in zip(lengths, bodies, strict=True):
        frame += struct.pack(">H", length) + (body * (length // max(len(body), 1) + 1))[:length]
    check_invariants(frame)
    check_invariants(frame[:cut])
    # Packets decoded from a cut frame are exactly the first packets of the whole frame.
    whole = decode_frame(frame).ticks
    decoded = decode_frame(frame[:cut]).ticks
    assert decoded.tobytes() == whole[: len(decoded)].tobytes()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.sampled_from(PACKET_LENGTHS), min_size=1, max_size=20),
    st.data(),
)
def test_any_cut_of_a_good_frame_yields_a_prefix_of_its_ticks(lengths, data):
    frame = encode_frame(ticks_of(lengths))
    whole = decode_frame(frame).ticks
    cut = data.draw(st.integers(min_value=0, max_value=len(frame)))
    decoded = decode_frame(frame[:cut])
    k = len(decoded.ticks)
    assert decoded.ticks.tobytes() == whole[:k].tobytes()
    if cut == len(frame):
        assert k == len(lengths) and decoded.malformed == 0
    else:
        assert decoded.malformed >= 1 or cut == 1


def test_bytearray_and_memoryview_decode_like_bytes():
    frame = encode_frame(ticks_of([PACKET_FULL, PACKET_LTP, PACKET_QUOTE]))
    expected = decode_frame(frame).ticks
    for variant in (bytearray(frame), memoryview(frame), memoryview(bytearray(frame))):
        decoded = decode_frame(variant)
        assert decoded.malformed == 0
        assert decoded.ticks.tobytes() == expected.tobytes()
    assert decode_frame(bytearray(b"\x00")).heartbeat
