"""The engine's frame recorder: frames recorded on its own thread in order with monotonic
receive times, rotated at the file size cap, the directory kept under its total cap, and frames
beyond the pending bound dropped and marked rather than queued without end."""

import os
import threading
import time

import pytest

from streaming.engine.metrics import EngineMetrics
from streaming.engine.recorder import FrameRecorder
from streaming.kite.codec import encode_frame
from streaming.kite.recording import SUFFIX, RecordingReader, RecordKind
from tests.streaming.engine.builders import NIFTY_FUT, tick, ticks


def frame(price: float) -> bytes:
    return encode_frame(ticks(tick(NIFTY_FUT, price)))


def read_all(paths) -> list:
    records = []
    for path in paths:
        with RecordingReader(path) as reader:
            records += list(reader.records())
            assert reader.damage is None
    return records


def recordings(directory) -> list:
    return sorted(directory.rglob(f"*{SUFFIX}"))


def make(tmp_path, **kwargs) -> tuple[FrameRecorder, EngineMetrics]:
    metrics = EngineMetrics()
    defaults = {"max_file_bytes": 1 << 20, "max_total_bytes": 1 << 30}
    return FrameRecorder(directory=tmp_path, metrics=metrics, **{**defaults, **kwargs}), metrics


def test_frames_are_written_by_the_recorder_thread_in_order(tmp_path):
    recorder, metrics = make(tmp_path)
    sink = recorder.open(account="acc/1")  # a label that is not a file name
    writer_threads = {t.name for t in threading.enumerate()}
    assert "frame-recorder" in writer_threads
    sent = [frame(26000.0 + i) for i in range(50)] + ['{"type": "order"}', b"\x00"]
    for message in sent:
        sink(message)
    recorder.close()
    paths = recordings(tmp_path)
    assert [p.parent.name for p in paths] == ["acc_1"]
    assert paths[0].name.startswith("acc_1-") and paths[0].name.endswith(f"-0000{SUFFIX}")
    records = read_all(paths)
    assert [r.message() for r in records] == sent
    assert records[-2].kind is RecordKind.TEXT
    times = [r.received_ns for r in records]
    assert times == sorted(times)
    with RecordingReader(paths[0]) as reader:
        assert reader.header.account == "acc/1"
        assert abs(reader.header.started_at_ns - time.time_ns()) < 60e9
    assert metrics.recorded_frames.labels("acc/1")._value.get() == len(sent)


def test_files_rotate_at_the_size_cap_and_read_back_as_one_stream(tmp_path):
    recorder, _ = make(tmp_path, max_file_bytes=4096, block_bytes=1)  # a block per frame
    sink = recorder.open(account="acc1")
    rng_frames = [os.urandom(3000) for _ in range(12)]  # incompressible
    for message in rng_frames:
        sink(message)
    recorder.close()
    paths = recordings(tmp_path)
    assert len(paths) > 2
    indexes = []
    for path in paths:
        with RecordingReader(path) as reader:
            indexes.append(reader.header.file_index)
    assert sorted(indexes) == list(range(len(paths)))
    by_index = [p for _, p in sorted(zip(indexes, paths, strict=True))]
    assert [r.message() for r in read_all(by_index)] == rng_frames


def test_the_oldest_recordings_are_deleted_to_keep_the_total_cap(tmp_path):
    old = tmp_path / "acc0"
    old.mkdir()
    for n in range(5):
        path = old / f"acc0-2026010{n}T000000-0000{SUFFIX}"
        path.write_bytes(b"x" * 1000)
        os.utime(path, (1_700_000_000 + n, 1_700_000_000 + n))
    unrelated = tmp_path / "notes.txt"
    unrelated.write_bytes(b"y" * 5000)
    # Room for 2 old files beside one open file of at most 1000 bytes.
    recorder, _ = make(tmp_path, max_file_bytes=1000, max_total_bytes=3000, spare_recent_s=0)
    recorder.open(account="acc1")(frame(26000.0))
    recorder.close()
    left = sorted(p.name for p in old.iterdir())
    assert left == [f"acc0-2026010{n}T000000-0000{SUFFIX}" for n in (3, 4)]
    assert unrelated.exists()
    assert len(recordings(tmp_path / "acc1")) == 1


def test_recent_files_of_another_engine_are_never_deleted(tmp_path):
    other = tmp_path / "acc9"
    other.mkdir()
    (other / f"acc9-20260101T000000-0000{SUFFIX}").write_bytes(b"x" * 5000)
    recorder, _ = make(tmp_path, max_file_bytes=1000, max_total_bytes=1000)
    recorder.open(account="acc1")(frame(26000.0))
    recorder.close()
    assert (other / f"acc9-20260101T000000-0000{SUFFIX}").exists()


def test_frames_beyond_the_pending_bound_are_dropped_and_marked(tmp_path):
    recorder, metrics = make(tmp_path, max_pending_bytes=1000)
    sink = recorder.open(account="acc1")
    small_1, big, small_2 = frame(1.0), os.urandom(5000), frame(2.0)
    sink(small_1)
    sink(big)  # more than the whole bound: never queued
    sink(small_2)
    recorder.close()
    records = read_all(recordings(tmp_path))
    assert [(r.kind, r.payload) for r in records] == [
        (RecordKind.BINARY, small_1),
        (RecordKind.GAP, (1).to_bytes(4, "big")),
        (RecordKind.BINARY, small_2),
    ]
    assert metrics.recording_dropped.labels("acc1")._value.get() == 1


def test_stopping_an_account_closes_its_file_and_a_restart_opens_another(tmp_path):
    recorder, _ = make(tmp_path)
    recorder.open(account="acc1")(frame(1.0))
    recorder.stop_account(account="acc1")
    recorder.open(account="acc1")(frame(2.0))
    recorder.close()
    paths = recordings(tmp_path)
    assert len(paths) == 2
    assert [r.payload for r in read_all(paths)] == [frame(1.0), frame(2.0)]


def test_settings_that_cannot_work_are_refused(tmp_path):
    with pytest.raises(ValueError, match="max file 2000 bytes must be positive and at most"):
        make(tmp_path, max_file_bytes=2000, max_total_bytes=1000)
    with pytest.raises(ValueError, match=r"TICKER_RECORDING_ZSTD_LEVEL must be in \[-100, 22\], got 23"):
        make(tmp_path, zstd_level=23)


@pytest.mark.parametrize("level", [-5, 1, 3])
def test_every_level_reads_back(tmp_path, level):
    recorder, _ = make(tmp_path, zstd_level=level)
    sent = [frame(26000.0 + i) for i in range(20)]
    sink = recorder.open(account="acc1")
    for message in sent:
        sink(message)
    recorder.close()
    assert [r.payload for r in read_all(recordings(tmp_path))] == sent
