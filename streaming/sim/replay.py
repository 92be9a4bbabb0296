"""A recording as the simulator's source of ticker messages (``manage.py replay``).

:class:`ReplaySource` opens recordings (refusing, before anything is served, a file that is
not a recording or was written under another schema version), and yields their messages in
order with their receive times, within an optional window. A damaged file ends the replay at
the damage: what came before is served, and :attr:`ReplaySource.damage` says where.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from streaming.kite.recording import RecordingDamage, RecordingReader, RecordKind

__all__ = ["ReplaySource"]


class ReplaySource:
    """The messages of ``paths`` (one account's rotation, in order), paced by ``speed``.

    ``start_ns`` / ``end_ns``: keep only messages received in [start, end] (epoch ns).
    """

    def __init__(
        self,
        paths: Sequence[Path | str],
        *,
        speed: float = 1.0,
        start_ns: int | None = None,
        end_ns: int | None = None,
    ) -> None:
        if not paths:
            raise ValueError("a replay needs at least one recording")
        if not speed > 0:
            raise ValueError(f"speed must be positive, got {speed}")
        if start_ns is not None and end_ns is not None and end_ns < start_ns:
            raise ValueError("the replay window ends before it starts")
        self.speed = float(speed)
        self.start_ns = start_ns
        self.end_ns = end_ns
        # Every header is read (and every refusal raised) before anything is served.
        self.readers: list[RecordingReader] = []
        try:
            for path in paths:
                self.readers.append(RecordingReader(path))
        except BaseException:
            self.close()
            raise
        self.readers.sort(key=lambda r: (r.header.started_at_ns, r.header.file_index))
        self.damage: RecordingDamage | None = None
        self.sent = 0
        self.binary_bytes_sent = 0
        self.gap_frames = 0  # frames the recorder had to drop, as marked in the files
        self.first_received_ns: int | None = None  # of the messages yielded so far
        self.last_received_ns: int | None = None
        self.first_sent_s: float | None = None  # monotonic, set by the simulator
        self.last_sent_s: float | None = None

    @property
    def intended_s(self) -> float:
        """How long sending what was sent should take: the recorded span over the speed."""
        if self.first_received_ns is None or self.last_received_ns is None:
            return 0.0
        return (self.last_received_ns - self.first_received_ns) / 1e9 / self.speed

    @property
    def achieved_s(self) -> float:
        """How long sending it took, first message to last."""
        if self.first_sent_s is None or self.last_sent_s is None:
            return 0.0
        return self.last_sent_s - self.first_sent_s

    def close(self) -> None:
        for reader in self.readers:
            reader.close()

    def messages(self) -> Iterator[tuple[int, bytes | str]]:
        """(receive time in epoch ns, message) for every message in the window, in order."""
        for reader in self.readers:
            base_ns = reader.header.started_at_ns
            for record in reader.records():
                received_ns = base_ns + record.received_ns
                if self.start_ns is not None and received_ns < self.start_ns:
                    continue
                if self.end_ns is not None and received_ns > self.end_ns:
                    return
                if record.kind is RecordKind.GAP:
                    self.gap_frames += int.from_bytes(record.payload, "big")
                    continue
                if self.first_received_ns is None:
                    self.first_received_ns = received_ns
                self.last_received_ns = received_ns
                yield received_ns, record.message()
            if reader.damage is not None:
                self.damage = reader.damage
                return
