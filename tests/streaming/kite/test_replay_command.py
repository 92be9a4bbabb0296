"""``manage.py replay`` as a process: a Kite ticker client connects to the URL it prints,
subscribes, and receives the recorded messages byte for byte, in order, within ``--from`` /
``--to``; a damaged file is replayed up to the damage and the command fails naming the file,
byte offset and frame; another schema version and non-recordings are refused before serving."""

import asyncio
import re
import struct
from pathlib import Path

import orjson
import pytest
from django.core.management import CommandError, call_command
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from streaming.kite.codec import encode_frame
from streaming.kite.recording import MAGIC, RecordingHeader, RecordingWriter, RecordKind
from streaming.market import IST
from tests.helpers import wait_until
from tests.streaming.engine.builders import NIFTY_FUT, NIFTY_INDEX, tick, ticks
from tests.streaming.engine.runtime_helpers import ManagePy, subprocess_env

START_NS = 1_764_821_400_000_000_000  # 2025-12-04 04:10:00 UTC = 09:40 IST
STEP_NS = 100_000_000  # a frame every 100 ms as recorded


def messages(n: int) -> list[bytes | str]:
    out: list[bytes | str] = []
    for i in range(n):
        out.append(encode_frame(ticks(tick(NIFTY_FUT, 26000.0 + i), tick(NIFTY_INDEX, 25990.0 + i))))
        if i == 5:
            out.append(orjson.dumps({"type": "message", "data": "market notice"}).decode())
    return out


def write_recording(path: Path, sent: list[bytes | str], *, block_every: int = 4) -> list[int]:
    """One message per STEP_NS; returns each block's byte offset."""
    header = RecordingHeader(account="acc1", started_at_ns=START_NS, file_index=0)
    writer = RecordingWriter(path, header=header, monotonic_start_ns=0)
    offsets = []
    for i, message in enumerate(sent):
        if i % block_every == 0:
            writer.flush()
            offsets.append(writer.size)
        text = isinstance(message, str)
        writer.add(RecordKind.TEXT if text else RecordKind.BINARY, i * STEP_NS,
                   message.encode() if text else message)
    writer.close()
    return offsets


def start_replay(tmp_path: Path, *args: str) -> tuple[ManagePy, str]:
    proc = ManagePy(["replay", *args, "--port", "0", "--api-key", "k1", "--access-token", "t1"],
                    env=subprocess_env(), log_path=tmp_path / "replay.log")
    found = wait_until(lambda: re.search(r"KITE_WS_URL=(\S+)", proc.output()) or not proc.alive(),
                       timeout_s=60, what="the replay's URL printed")
    assert proc.alive(), proc.output()
    return proc, found.group(1)


async def receive_all(ws_url: str) -> list[bytes | str]:
    """Connect as runticker's client would, subscribe, and read until the replay closes."""
    got: list[bytes | str] = []
    async with connect(f"{ws_url}?api_key=k1&access_token=t1") as ws:
        await ws.send(orjson.dumps({"a": "subscribe", "v": [NIFTY_FUT]}).decode())
        try:
            while True:
                message = await asyncio.wait_for(ws.recv(), timeout=60)
                if message != b"\x00":  # the simulator's own heartbeats while idle
                    got.append(message)
        except ConnectionClosed:
            return got


def finish(proc: ManagePy) -> tuple[int, str]:
    code = proc.proc.wait(timeout=60)
    return code, proc.output()


def test_the_recording_comes_through_the_websocket_at_speed(tmp_path):
    path = tmp_path / "acc1.tkrec"
    sent = messages(30)
    write_recording(path, sent)
    proc, ws_url = start_replay(tmp_path, str(path), "--speed", "10")
    try:
        got = asyncio.run(receive_all(ws_url))
        code, output = finish(proc)
    finally:
        proc.stop()
    assert code == 0, output
    assert got == sent
    assert f"{path}: account acc1, file 0, started 2025-12-04T04:10:00+00:00" in output
    # 31 messages 100 ms apart as recorded: 3.0 s at speed 1, 0.3 s at speed 10.
    summary = re.search(r"replayed 31 messages \(\d+ bytes of binary frames\) at speed 10: "
                        r"sent in ([\d.]+) s, recorded pace ([\d.]+) s", output)
    assert summary, output
    assert float(summary.group(2)) == pytest.approx(0.3, abs=0.01)


def test_from_and_to_select_by_receive_time(tmp_path):
    path = tmp_path / "acc1.tkrec"
    sent = messages(30)
    write_recording(path, sent)
    # Messages 10..20 were received at 09:40:01.0 .. 09:40:02.0 IST (naive times are IST).
    proc, ws_url = start_replay(tmp_path, str(path), "--speed", "10",
                                "--from", "2025-12-04T09:40:01", "--to", "2025-12-04T04:10:02+00:00")
    try:
        got = asyncio.run(receive_all(ws_url))
        code, output = finish(proc)
    finally:
        proc.stop()
    assert code == 0, output
    assert got == sent[10:21]


def test_a_truncated_recording_replays_up_to_the_damage_and_fails_saying_where(tmp_path):
    path = tmp_path / "acc1.tkrec"
    sent = messages(30)
    offsets = write_recording(path, sent)  # blocks of 4 messages
    path.write_bytes(path.read_bytes()[: offsets[3] + 9])  # the 4th block cut short
    proc, ws_url = start_replay(tmp_path, str(path), "--speed", "10")
    try:
        got = asyncio.run(receive_all(ws_url))
        code, output = finish(proc)
    finally:
        proc.stop()
    assert got == sent[:12]
    assert code == 1
    assert (f"replay stopped at damage: {path}: damaged at byte offset {offsets[3]} (frame 12): "
            "truncated block") in output
    assert "frames 0..11 were read" in output


def test_a_corrupt_block_replays_up_to_the_damage(tmp_path):
    path = tmp_path / "acc1.tkrec"
    sent = messages(30)
    offsets = write_recording(path, sent)
    data = bytearray(path.read_bytes())
    data[offsets[2] + 15] ^= 0x55
    path.write_bytes(bytes(data))
    proc, ws_url = start_replay(tmp_path, str(path), "--speed", "10")
    try:
        got = asyncio.run(receive_all(ws_url))
        code, output = finish(proc)
    finally:
        proc.stop()
    assert got == sent[:8]
    assert code == 1
    assert f"damaged at byte offset {offsets[2]} (frame 8): block checksum mismatch" in output


def test_another_schema_version_is_refused_before_serving(tmp_path):
    path = tmp_path / "acc1.tkrec"
    write_recording(path, messages(3))
    data = bytearray(path.read_bytes())
    struct.pack_into(">H", data, len(MAGIC), 7)
    path.write_bytes(bytes(data))
    with pytest.raises(CommandError) as caught:
        call_command("replay", str(path), "--port", "0")
    assert str(caught.value) == (
        f"{path}: recorded under recording schema 7; this version of tickerproj reads schema 1 "
        "only (replay it with a matching version)"
    )


def test_a_file_that_is_not_a_recording_is_refused(tmp_path):
    path = tmp_path / "prices.csv"
    path.write_text("token,price\n256265,26000\n")
    with pytest.raises(CommandError) as caught:
        call_command("replay", str(path), "--port", "0")
    assert str(caught.value) == (
        f"{path}: not a tickerproj recording (expected it to start with {MAGIC!r}, "
        "got b'token,pr')"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--speed", "0"], "--speed must be positive, got 0.0"),
        (["--from", "yesterday"], "expected an ISO 8601 time such as 2026-12-04T09:20:00+05:30, "
                                  "got 'yesterday'"),
        (["--from", "2025-12-04T10:00", "--to", "2025-12-04T09:00"], "--to is before --from"),
    ],
)
def test_bad_options_are_refused(tmp_path, args, message):
    path = tmp_path / "acc1.tkrec"
    write_recording(path, messages(3))
    with pytest.raises(CommandError) as caught:
        call_command("replay", str(path), "--port", "0", *args)
    assert str(caught.value) == message


def test_naive_times_are_india_time():
    from streaming.management.commands.replay import parse_when

    assert parse_when("2025-12-04T09:40:00") == START_NS
    assert parse_when("2025-12-04T09:40:00+05:30") == START_NS
    assert IST.utcoffset(None).total_seconds() == 19800
