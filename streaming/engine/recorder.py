"""Records the raw Kite frames of the accounts that opt in, on a thread of its own.

The tick path pays only for a timestamp and a queue append: the Kite client's raw-frame
callback (``FrameRecorder.open`` returns it) runs on the event loop, and compression, writes,
rotation and the size cap run on the recorder's thread. If that thread falls behind (a slow
disk) by more than ``max_pending_bytes``, frames are dropped, counted and marked in the file
with a GAP record, rather than letting memory grow or the event loop wait.

Files: ``<directory>/<label>/<label>-<UTC start>-<index>.tkrec`` (format in
:mod:`streaming.kite.recording`), a new one whenever the current one reaches
``max_file_bytes``. ``max_total_bytes`` caps the directory: before a file is opened the oldest
closed recordings are deleted until the closed ones plus ``max_file_bytes`` per open file fit
(files written to in the last minute count as open: several engines may share a directory).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from streaming.engine.metrics import EngineMetrics
from streaming.kite.recording import (
    SUFFIX,
    ZSTD_LEVEL,
    ZSTD_LEVELS,
    RecordingHeader,
    RecordingWriter,
    RecordKind,
)

log = structlog.get_logger(__name__)

MAX_PENDING_BYTES = 64 * 1024 * 1024
"""Frames queued for the recorder thread beyond this are dropped (and marked in the file)."""
BLOCK_INTERVAL_S = 1.0
"""A block is written at least this often: what a killed process can lose."""
BLOCK_BYTES = 1024 * 1024
"""...or as soon as this much is buffered."""
FAILURE_PAUSE_S = 5.0
"""After a failed write the thread waits this long before opening new files."""
RECENT_FILE_S = 60.0
"""A file written to this recently may be another engine's open file: the cap spares it."""

RawFrameSink = Callable[[bytes | str], None]

_STOP = object()


def _file_label(label: str) -> str:
    """The label as a file name part (labels are free text in the admin)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", label).strip(".") or "account"


@dataclass
class _Open:
    """One account's recording in progress (recorder thread only)."""

    label: str
    writer: RecordingWriter
    first_buffered_s: float | None = None
    files: int = 1


@dataclass
class _Pending:
    """What the event loop has queued and not yet handed over (under the lock)."""

    bytes: int = 0
    dropped: dict[str, int] = field(default_factory=dict)


class FrameRecorder:
    """Rotating, size-capped recordings of raw frames per account; one writer thread."""

    def __init__(
        self,
        *,
        directory: Path,
        max_file_bytes: int,
        max_total_bytes: int,
        metrics: EngineMetrics,
        zstd_level: int = ZSTD_LEVEL,
        max_pending_bytes: int = MAX_PENDING_BYTES,
        spare_recent_s: float = RECENT_FILE_S,
        block_bytes: int = BLOCK_BYTES,
        block_interval_s: float = BLOCK_INTERVAL_S,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
        wall_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        if zstd_level not in ZSTD_LEVELS:
            raise ValueError(
                f"TICKER_RECORDING_ZSTD_LEVEL must be in [{ZSTD_LEVELS.start}, "
                f"{ZSTD_LEVELS.stop - 1}], got {zstd_level}"
            )
        if max_file_bytes <= 0 or max_total_bytes < max_file_bytes:
            raise ValueError(
                f"recording sizes: max file {max_file_bytes} bytes must be positive and at most "
                f"the max total {max_total_bytes} bytes"
            )
        self.directory = Path(directory)
        self.max_file_bytes = max_file_bytes
        self.max_total_bytes = max_total_bytes
        self._metrics = metrics
        self._zstd_level = zstd_level
        self._max_pending_bytes = max_pending_bytes
        self._spare_recent_s = spare_recent_s
        self._block_bytes = block_bytes
        self._block_interval_s = block_interval_s
        self._monotonic_ns = monotonic_ns
        self._wall_ns = wall_ns
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending = _Pending()
        self._thread: threading.Thread | None = None
        self._open: dict[str, _Open] = {}  # recorder thread only

    # --- the event loop's side --------------------------------------------------------------

    def open(self, *, account: str) -> RawFrameSink:
        """Start recording ``account``; returns the raw-frame callback for its Kite client."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="frame-recorder", daemon=True)
            self._thread.start()
        log.info("recorder.account_started", account=account, directory=str(self.directory))
        put = self._queue.put
        clock = self._monotonic_ns
        lock, pending, limit = self._lock, self._pending, self._max_pending_bytes
        dropped = self._metrics.recording_dropped.labels(account)

        def record(message: bytes | str) -> None:
            received_ns = clock()
            if isinstance(message, str):
                kind, payload = RecordKind.TEXT, message.encode()
            else:
                kind, payload = RecordKind.BINARY, message
            with lock:
                if pending.bytes + len(payload) > limit:
                    pending.dropped[account] = pending.dropped.get(account, 0) + 1
                    dropped.inc()
                    return
                pending.bytes += len(payload)
                gap = pending.dropped.pop(account, 0)  # dropped just before this frame
            put((account, kind, received_ns, payload, gap))

        return record

    def stop_account(self, *, account: str) -> None:
        """Close ``account``'s file after what it has queued; its sink must not be used again."""
        if self._thread is not None:
            self._queue.put((account, None, 0, b"", 0))
            log.info("recorder.account_stopped", account=account)

    def close(self, *, timeout_s: float = 10.0) -> None:
        """Write what is queued, close every file and end the thread (blocking: use a thread)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._queue.put(_STOP)
        thread.join(timeout_s)
        if thread.is_alive():
            log.error("recorder.close_timeout", timeout_s=timeout_s)

    # --- the recorder thread ----------------------------------------------------------------

    def _run(self) -> None:
        cpu_started = time.thread_time()
        cpu_seconds = self._metrics.recorder_cpu_seconds
        try:
            while True:
                try:
                    item = self._queue.get(timeout=self._next_flush_in_s())
                except queue.Empty:
                    item = None
                if item is _STOP:
                    return
                try:
                    if item is not None:
                        self._take(*item)
                    self._flush_due()
                except OSError as exc:
                    # A full or failing disk: give up the open files (each keeps what it
                    # wrote), pause, and start new files afterwards; frames queued meanwhile
                    # stay bounded by max_pending_bytes.
                    log.error("recorder.write_failed", error=str(exc),
                              accounts=sorted(self._open))
                    self._abandon_open_files()
                    time.sleep(FAILURE_PAUSE_S)
                now = time.thread_time()
                cpu_seconds.inc(now - cpu_started)
                cpu_started = now
        finally:
            for account in list(self._open):
                self._close(account)

    def _take(
        self, account: str, kind: RecordKind | None, received_ns: int, payload: bytes, gap: int
    ) -> None:
        if kind is None:
            self._close(account)
            return
        with self._lock:
            self._pending.bytes -= len(payload)
        current = self._open.get(account)
        if current is None:
            current = self._open[account] = _Open(account, self._new_writer(account, index=0))
        if gap:
            current.writer.add(RecordKind.GAP, received_ns, gap.to_bytes(4, "big"))
        current.writer.add(kind, received_ns, payload)
        if current.first_buffered_s is None:
            current.first_buffered_s = time.monotonic()
        self._metrics.recorded_frames.labels(account).inc()
        if current.writer.buffered_bytes >= self._block_bytes:
            self._write_block(current)

    def _next_flush_in_s(self) -> float | None:
        due = [o.first_buffered_s for o in self._open.values() if o.first_buffered_s is not None]
        if not due:
            return None
        return max(0.0, min(due) + self._block_interval_s - time.monotonic())

    def _flush_due(self) -> None:
        now = time.monotonic()
        for current in list(self._open.values()):
            started = current.first_buffered_s
            if started is not None and now - started >= self._block_interval_s:
                self._write_block(current)

    def _write_block(self, current: _Open) -> None:
        current.writer.flush()
        current.first_buffered_s = None
        if current.writer.size >= self.max_file_bytes:
            current.writer.close()
            log.info("recorder.rotated", account=current.label, file=current.writer.path.name,
                     bytes=current.writer.size, frames=current.writer.frames)
            current.writer = self._new_writer(current.label, index=current.files)
            current.files += 1

    def _abandon_open_files(self) -> None:
        for current in self._open.values():
            with contextlib.suppress(OSError):
                current.writer.close()
        self._open.clear()

    def _close(self, account: str) -> None:
        current = self._open.pop(account, None)
        if current is not None:
            current.writer.close()
            log.info("recorder.closed", account=account, file=current.writer.path.name,
                     bytes=current.writer.size, frames=current.writer.frames)

    def _new_writer(self, account: str, *, index: int) -> RecordingWriter:
        folder = self.directory / _file_label(account)
        folder.mkdir(parents=True, exist_ok=True)
        self._enforce_total(opening=account)
        started_ns = self._wall_ns()
        stamp = dt.datetime.fromtimestamp(started_ns / 1e9, tz=dt.UTC).strftime("%Y%m%dT%H%M%S")
        header = RecordingHeader(account=account, started_at_ns=started_ns, file_index=index)
        while True:
            path = folder / f"{_file_label(account)}-{stamp}-{index:04d}{SUFFIX}"
            try:
                writer = RecordingWriter(path, header=header, level=self._zstd_level,
                                         monotonic_start_ns=self._monotonic_ns())
            except FileExistsError:  # a restart within the same second
                index += 1
                continue
            log.info("recorder.file_opened", account=account, file=path.name)
            return writer

    def _enforce_total(self, *, opening: str) -> None:
        """Delete the oldest closed recordings until the cap holds with room for open files."""
        open_paths = {o.writer.path for o in self._open.values() if o.label != opening}
        now_s = time.time()
        closed: list[tuple[float, int, Path]] = []
        for path in self.directory.rglob(f"*{SUFFIX}"):
            try:
                stat = path.stat()
            except FileNotFoundError:  # deleted by another engine sharing the directory
                continue
            # Another engine's open file was written within the last seconds (Kite's
            # heartbeats alone make a block a second): never delete it under that engine.
            if path not in open_paths and now_s - stat.st_mtime >= self._spare_recent_s:
                closed.append((stat.st_mtime, stat.st_size, path))
        closed.sort()
        room = self.max_file_bytes * (len(open_paths) + 1)
        total = sum(size for _, size, _ in closed)
        while closed and total + room > self.max_total_bytes:
            _, size, oldest = closed.pop(0)
            oldest.unlink(missing_ok=True)
            total -= size
            log.info("recorder.deleted_oldest", file=str(oldest.relative_to(self.directory)),
                     bytes=size, total_bytes=total)
