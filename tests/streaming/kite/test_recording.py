"""The recording file format: what is written is read back in order with its receive times;
damage (a flipped byte, a cut file) is found and reported by file, byte offset and frame
number after every record before it; another schema version and other files are refused."""

import struct
import zlib
from pathlib import Path

import orjson
import pytest

from streaming.kite.codec import encode_frame
from streaming.kite.recording import (
    MAGIC,
    NotARecordingError,
    RecordingError,
    RecordingHeader,
    RecordingReader,
    RecordingSchemaError,
    RecordingWriter,
    RecordKind,
)
from tests.streaming.engine.builders import NIFTY_FUT, NIFTY_INDEX, tick, ticks

START_NS = 1_764_821_400_000_000_000  # a wall-clock start (epoch ns)
MONO_NS = 5_000_000_000  # the monotonic clock at that start


def frame(price: float) -> bytes:
    return encode_frame(ticks(tick(NIFTY_FUT, price), tick(NIFTY_INDEX, price - 10, length=184)))


def write(path: Path, messages: list[tuple[int, bytes | str]], *, block_every: int = 2) -> list[int]:
    """Write ``messages`` (monotonic offset ns, message); a block every ``block_every`` records.
    Returns the byte offset at which each block starts."""
    header = RecordingHeader(account="acc1", started_at_ns=START_NS, file_index=0)
    writer = RecordingWriter(path, header=header, monotonic_start_ns=MONO_NS)
    offsets = [writer.size]
    for n, (offset_ns, message) in enumerate(messages, start=1):
        if isinstance(message, str):
            writer.add(RecordKind.TEXT, MONO_NS + offset_ns, message.encode())
        else:
            writer.add(RecordKind.BINARY, MONO_NS + offset_ns, message)
        if n % block_every == 0:
            writer.flush()
            offsets.append(writer.size)
    writer.close()
    return offsets[: -1 if len(messages) % block_every == 0 else None]


MESSAGES = [
    (0, frame(26000.0)),
    (1_000_000, b"\x00"),  # Kite's heartbeat
    (250_000_000, frame(26001.5)),
    (260_000_000, '{"type": "order", "data": {"order_id": "1"}}'),
    (500_000_000, frame(26003.0)),
    (750_000_000, frame(26002.0)),
]


def test_frames_come_back_byte_for_byte_with_their_receive_times(tmp_path):
    path = tmp_path / "a.tkrec"
    write(path, MESSAGES)
    with RecordingReader(path) as reader:
        assert reader.header.account == "acc1"
        assert reader.header.started_at_ns == START_NS
        records = list(reader.records())
        assert reader.damage is None
    assert [(r.received_ns, r.message()) for r in records] == MESSAGES
    assert [r.kind for r in records] == [RecordKind.BINARY] * 3 + [RecordKind.TEXT] + [
        RecordKind.BINARY
    ] * 2


def test_the_file_is_compressed(tmp_path):
    path = tmp_path / "a.tkrec"
    same = [(i * 1_000_000, frame(26000.0)) for i in range(200)]
    write(path, same, block_every=200)
    raw = sum(len(m) for _, m in same)
    assert path.stat().st_size < raw / 5


def test_a_flipped_byte_stops_the_replay_at_its_block_and_says_where(tmp_path):
    path = tmp_path / "a.tkrec"
    offsets = write(path, MESSAGES)  # blocks of 2 records: frames 0-1, 2-3, 4-5
    data = bytearray(path.read_bytes())
    data[offsets[1] + 20] ^= 0xFF  # inside the second block's compressed bytes
    path.write_bytes(bytes(data))
    with RecordingReader(path) as reader:
        records = list(reader.records())
        damage = reader.damage
    assert [r.message() for r in records] == [m for _, m in MESSAGES[:2]]
    assert damage is not None
    assert (damage.path, damage.offset, damage.frame) == (str(path), offsets[1], 2)
    assert damage.reason == "block checksum mismatch"
    assert str(damage) == (
        f"{path}: damaged at byte offset {offsets[1]} (frame 2): block checksum mismatch; "
        "frames 0..1 were read"
    )


@pytest.mark.parametrize("cut", [1, 7, 20])
def test_a_truncated_file_replays_up_to_the_cut(tmp_path, cut):
    path = tmp_path / "a.tkrec"
    offsets = write(path, MESSAGES)
    data = path.read_bytes()
    path.write_bytes(data[: offsets[2] + cut])  # cut inside the third block
    with RecordingReader(path) as reader:
        records = list(reader.records())
        damage = reader.damage
    assert [r.message() for r in records] == [m for _, m in MESSAGES[:4]]
    assert (damage.offset, damage.frame) == (offsets[2], 4)
    assert damage.reason.startswith("truncated block")


def test_a_file_cut_between_blocks_is_read_whole_up_to_the_cut(tmp_path):
    """A process killed between two block writes leaves a readable, shorter recording."""
    path = tmp_path / "a.tkrec"
    offsets = write(path, MESSAGES)
    path.write_bytes(path.read_bytes()[: offsets[2]])
    with RecordingReader(path) as reader:
        assert len(list(reader.records())) == 4
        assert reader.damage is None


def test_a_block_whose_records_do_not_fit_is_damage(tmp_path):
    """A block that passes its checksum but holds a bad record count (a writer bug, or an
    edit) is reported as damage, not read past."""
    path = tmp_path / "a.tkrec"
    offsets = write(path, MESSAGES)
    data = bytearray(path.read_bytes())
    length, crc, count = struct.unpack_from(">III", data, offsets[1])
    struct.pack_into(">III", data, offsets[1], length, crc, count + 1)
    path.write_bytes(bytes(data))
    with RecordingReader(path) as reader:
        assert len(list(reader.records())) == 2
        assert reader.damage.frame == 2
        assert reader.damage.reason == "block does not decode: record 2 of 3 starts past the block's end"


def test_another_schema_version_is_refused_before_anything_is_read(tmp_path):
    path = tmp_path / "future.tkrec"
    write(path, MESSAGES)
    data = bytearray(path.read_bytes())
    struct.pack_into(">H", data, len(MAGIC), 2)
    path.write_bytes(bytes(data))
    with pytest.raises(RecordingSchemaError) as caught:
        RecordingReader(path)
    assert caught.value.got == 2
    assert str(caught.value) == (
        f"{path}: recorded under recording schema 2; this version of tickerproj reads schema 1 "
        "only (replay it with a matching version)"
    )


@pytest.mark.parametrize(
    "content", [b"", b"TPK", b"\x00\x01binary junk" * 10, b'{"json": true}\n', b"PK\x03\x04zip"]
)
def test_a_file_that_is_not_a_recording_is_refused(tmp_path, content):
    path = tmp_path / "other.bin"
    path.write_bytes(content)
    with pytest.raises(NotARecordingError) as caught:
        RecordingReader(path)
    assert str(caught.value).startswith(f"{path}: not a tickerproj recording (expected it to start with")


def test_a_damaged_header_is_refused(tmp_path):
    path = tmp_path / "a.tkrec"
    write(path, MESSAGES)
    data = bytearray(path.read_bytes())
    data[len(MAGIC) + 6 + 3] ^= 0x01  # a byte of the header's JSON
    path.write_bytes(bytes(data))
    with pytest.raises(RecordingError, match="header checksum mismatch"):
        RecordingReader(path)


def test_a_missing_file_is_refused_clearly(tmp_path):
    with pytest.raises(RecordingError, match="cannot open: No such file or directory"):
        RecordingReader(tmp_path / "nope.tkrec")


def test_the_header_holds_the_label_and_start_only(tmp_path):
    path = tmp_path / "a.tkrec"
    write(path, MESSAGES)
    data = path.read_bytes()
    (length,) = struct.unpack_from(">I", data, len(MAGIC) + 2)
    header_json = data[len(MAGIC) + 6 : len(MAGIC) + 6 + length]
    assert orjson.loads(header_json) == {
        "account": "acc1", "started_at_ns": START_NS, "file_index": 0, "compression": "zstd",
    }
    assert struct.unpack_from(">I", data, len(MAGIC) + 6 + length)[0] == zlib.crc32(header_json)
