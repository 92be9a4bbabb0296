"""The recording file format: raw Kite ticker frames as received, timestamped and compressed.

A recording holds the frames one account's ticker connections received, byte for byte (binary
tick frames, Kite's one-byte heartbeats, text messages), so that ``manage.py replay`` can send
them again through the simulator's WebSocket and the engine consumes them through the live
protocol. No Django import: the engine's recorder writes it, the simulator reads it.

Layout of schema 1 (integers big-endian)::

    magic         8 bytes   b"TPKREC\\r\\n" (the line ending catches text-mode mangling)
    schema        u16       RECORDING_SCHEMA; a reader refuses any other
    header_len    u32
    header        JSON      RecordingHeader: account label, start time, file index, codec
    header_crc    u32       CRC-32 of the header JSON
    blocks        ...       until the end of the file

    block         u32 compressed_len, u32 crc32(compressed), u32 record_count, then a zstd
                  frame of ``record_count`` records
    record        u8 kind, u64 received_ns (monotonic ns since the header's start), u32
                  payload_len, payload

Receive times are monotonic offsets from the file's start, so a wall-clock step (NTP) never
reorders or stretches a recording; ``started_at_ns`` (wall clock at the start) places them in
time. Blocks are written every second or so: a process killed mid-file loses at most its last
block, and a damaged or truncated block is found by its length and checksum, so a reader
yields every record before the damage and says where it is (:class:`RecordingDamage`).

The header carries the account's label only: never its api_key or access token.
"""

from __future__ import annotations

import datetime as dt
import enum
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final, Literal

import orjson
import zstandard
from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "MAGIC",
    "RECORDING_SCHEMA",
    "NotARecordingError",
    "Record",
    "RecordKind",
    "RecordingDamage",
    "RecordingError",
    "RecordingHeader",
    "RecordingReader",
    "RecordingSchemaError",
    "RecordingWriter",
]

MAGIC: Final = b"TPKREC\r\n"
RECORDING_SCHEMA: Final = 1
SUFFIX: Final = ".tkrec"

_PREAMBLE = struct.Struct(">8sHI")  # magic, schema, header_len
_CRC = struct.Struct(">I")
_BLOCK = struct.Struct(">III")  # compressed_len, crc32, record_count
_RECORD = struct.Struct(">BQI")  # kind, received_ns, payload_len
MAX_HEADER_BYTES: Final = 64 * 1024
#: A block holds about a second of frames; anything claiming more is damage, not data.
MAX_BLOCK_BYTES: Final = 256 * 1024 * 1024
#: The default zstd level (TICKER_RECORDING_ZSTD_LEVEL): a fast negative level, because the
#: recorder's CPU is shared with the tick path and disk is cheaper (benchmarks/replay/README.md).
ZSTD_LEVEL: Final = -5
ZSTD_LEVELS: Final = range(-100, zstandard.MAX_COMPRESSION_LEVEL + 1)


class RecordKind(enum.IntEnum):
    BINARY = 1  # a binary frame: ticks or a heartbeat
    TEXT = 2  # a text message (order update, error, message), UTF-8
    GAP = 3  # payload u32: frames the recorder had to drop here (disk too slow)


class RecordingHeader(BaseModel):
    """What a recording file says about itself (the JSON after the preamble)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    account: str = Field(min_length=1, max_length=64)
    started_at_ns: int = Field(ge=0)  # wall clock (epoch ns) when the file began
    file_index: int = Field(ge=0)  # its place in the account's rotation
    compression: Literal["zstd"] = "zstd"

    @property
    def started_at(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.started_at_ns / 1e9, tz=dt.UTC)


@dataclass(frozen=True, slots=True)
class Record:
    """One frame as received: ``received_ns`` since the file's start (monotonic)."""

    kind: RecordKind
    received_ns: int
    payload: bytes

    def message(self) -> bytes | str:
        """The WebSocket message to send again: bytes for a binary frame, str for text."""
        return self.payload.decode() if self.kind is RecordKind.TEXT else self.payload


class RecordingError(Exception):
    """A file that cannot be replayed; the message names the file and what is wrong."""

    def __init__(self, path: Path | str, detail: str) -> None:
        self.path = str(path)
        self.detail = detail
        super().__init__(f"{path}: {detail}")


class NotARecordingError(RecordingError):
    """The file does not start like a recording (another kind of file)."""


class RecordingSchemaError(RecordingError):
    """A recording written under another schema version than this code reads."""

    def __init__(self, path: Path | str, *, got: int) -> None:
        self.got = got
        super().__init__(
            path,
            f"recorded under recording schema {got}; this version of tickerproj reads schema "
            f"{RECORDING_SCHEMA} only (replay it with a matching version)",
        )


@dataclass(frozen=True, slots=True)
class RecordingDamage:
    """Where a recording stops being readable: every frame before ``frame`` was read."""

    path: str
    offset: int  # byte offset in the file of the damaged block
    frame: int  # number (from 0) of the first frame not read
    reason: str

    def __str__(self) -> str:
        return (
            f"{self.path}: damaged at byte offset {self.offset} (frame {self.frame}): "
            f"{self.reason}; frames 0..{self.frame - 1} were read"
            if self.frame
            else f"{self.path}: damaged at byte offset {self.offset} (frame 0): {self.reason}; "
            "no frame was read"
        )


class RecordingWriter:
    """Writes one recording file; blocks are compressed and written by :meth:`flush`.

    Not thread-safe: the engine's recorder thread owns each writer. ``add`` only buffers.
    """

    def __init__(
        self,
        path: Path,
        *,
        header: RecordingHeader,
        monotonic_start_ns: int,
        level: int = ZSTD_LEVEL,
    ) -> None:
        self.path = path
        self.header = header
        self._start_ns = monotonic_start_ns
        if level not in ZSTD_LEVELS:
            raise ValueError(
                f"zstd level must be in [{ZSTD_LEVELS.start}, {ZSTD_LEVELS.stop - 1}], got {level}"
            )
        self._compressor = zstandard.ZstdCompressor(level=level)
        self._buffer = bytearray()
        self._count = 0
        self._file: BinaryIO = path.open("xb")
        header_json = orjson.dumps(header.model_dump())
        self._file.write(_PREAMBLE.pack(MAGIC, RECORDING_SCHEMA, len(header_json)))
        self._file.write(header_json)
        self._file.write(_CRC.pack(zlib.crc32(header_json)))
        self.size = self._file.tell()
        self.frames = 0

    @property
    def buffered_bytes(self) -> int:
        return len(self._buffer)

    def add(self, kind: RecordKind, monotonic_ns: int, payload: bytes) -> None:
        offset = max(0, monotonic_ns - self._start_ns)
        self._buffer += _RECORD.pack(kind, offset, len(payload))
        self._buffer += payload
        self._count += 1

    def flush(self) -> None:
        """Compress the buffered records into one block and write it out."""
        if not self._count:
            return
        compressed = self._compressor.compress(self._buffer)
        self._file.write(_BLOCK.pack(len(compressed), zlib.crc32(compressed), self._count))
        self._file.write(compressed)
        self._file.flush()
        self.size += _BLOCK.size + len(compressed)
        self.frames += self._count
        self._buffer.clear()
        self._count = 0

    def close(self) -> None:
        self.flush()
        self._file.close()


class RecordingReader:
    """Reads a recording: the header at once (refusing what is not one), then its records.

    ``records()`` yields every readable record and stops at the first damage, which it leaves
    in :attr:`damage` (None for a file read to its end).
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.damage: RecordingDamage | None = None
        try:
            self._file: BinaryIO = self.path.open("rb")
        except OSError as exc:
            raise RecordingError(path, f"cannot open: {exc.strerror or exc}") from None
        try:
            self.header = self._read_header()
        except BaseException:
            self._file.close()
            raise
        self._blocks_start = self._file.tell()

    def __enter__(self) -> RecordingReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def _read_header(self) -> RecordingHeader:
        preamble = self._file.read(_PREAMBLE.size)
        if len(preamble) < _PREAMBLE.size or not preamble.startswith(MAGIC):
            got = preamble[: len(MAGIC)]
            raise NotARecordingError(
                self.path,
                f"not a tickerproj recording (expected it to start with {MAGIC!r}, got {got!r})",
            )
        _, schema, header_len = _PREAMBLE.unpack(preamble)
        if schema != RECORDING_SCHEMA:
            raise RecordingSchemaError(self.path, got=schema)
        if header_len > MAX_HEADER_BYTES:
            raise RecordingError(
                self.path, f"header of {header_len} bytes exceeds {MAX_HEADER_BYTES} (damaged)"
            )
        header_json = self._file.read(header_len)
        crc = self._file.read(_CRC.size)
        if len(header_json) < header_len or len(crc) < _CRC.size:
            raise RecordingError(self.path, "truncated inside its header")
        if _CRC.unpack(crc)[0] != zlib.crc32(header_json):
            raise RecordingError(self.path, "header checksum mismatch (damaged header)")
        try:
            return RecordingHeader.model_validate(orjson.loads(header_json))
        except (orjson.JSONDecodeError, ValidationError) as exc:
            raise RecordingError(self.path, f"invalid header: {exc}") from None

    def records(self) -> Iterator[Record]:
        """Every record in order, up to the end of the file or the first damage."""
        self._file.seek(self._blocks_start)
        self.damage = None
        frame = 0
        decompressor = zstandard.ZstdDecompressor()
        while True:
            offset = self._file.tell()
            head = self._file.read(_BLOCK.size)
            if not head:
                return
            reason = None
            if len(head) < _BLOCK.size:
                reason = f"truncated block header ({len(head)} of {_BLOCK.size} bytes)"
            else:
                length, crc, count = _BLOCK.unpack(head)
                if length > MAX_BLOCK_BYTES:
                    reason = f"block length {length} exceeds {MAX_BLOCK_BYTES}"
                else:
                    compressed = self._file.read(length)
                    if len(compressed) < length:
                        reason = f"truncated block ({len(compressed)} of {length} bytes)"
                    elif zlib.crc32(compressed) != crc:
                        reason = "block checksum mismatch"
            if reason is None:
                try:
                    records = _parse_block(
                        decompressor.decompress(compressed, max_output_size=MAX_BLOCK_BYTES),
                        count,
                    )
                except (zstandard.ZstdError, ValueError) as exc:
                    reason = f"block does not decode: {exc}"
            if reason is not None:
                self.damage = RecordingDamage(
                    path=str(self.path), offset=offset, frame=frame, reason=reason
                )
                return
            yield from records
            frame += len(records)


def _parse_block(data: bytes, count: int) -> list[Record]:
    """The ``count`` records of one decompressed block; ValueError if they do not fit it."""
    records: list[Record] = []
    pos = 0
    view = memoryview(data)
    for number in range(count):
        if pos + _RECORD.size > len(data):
            raise ValueError(f"record {number} of {count} starts past the block's end")
        kind, received_ns, length = _RECORD.unpack_from(data, pos)
        pos += _RECORD.size
        if pos + length > len(data):
            raise ValueError(f"record {number} of {count} runs past the block's end")
        try:
            record_kind = RecordKind(kind)
        except ValueError:
            raise ValueError(f"record {number} has unknown kind {kind}") from None
        records.append(Record(record_kind, received_ns, bytes(view[pos : pos + length])))
        pos += length
    if pos != len(data):
        raise ValueError(f"{len(data) - pos} bytes after the block's {count} records")
    return records
