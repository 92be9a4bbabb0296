"""Recording's CPU cost inside runticker at 9,000 ticks/s, and replay at --speed 10.

    uv run python benchmarks/replay/run.py                 # ~3 minutes
    uv run python benchmarks/replay/run.py --seconds 20 --speed 10

Recording (side by side, one run): the benchmark's Kite simulator (benchmarks/engine/sim.py)
streams two accounts of 9,000 full-mode instruments each, every instrument every second
(9,000 ticks/s per account, Kite's maximum for one API key); two ``manage.py runticker``
processes stream one account each, one with ``record_frames`` on, the other off, at the same
time on the same machine. Per window: each process's CPU seconds (from /proc) over the ticks
it took in (its own counter) gives CPU per tick; the cost of recording is the difference as a
share of the recording process's CPU per tick. A second window swaps the roles (switched in
the admin's way, through the account service) so a difference between the two processes
cancels out. Also printed: the recorder thread's own CPU (its counter) as a share of its
process, the recording's size and compression ratio.

Replay: the recording made in the first window is served by ``manage.py replay --speed N``;
a WebSocket client subscribes and receives it. Intended duration (recorded span / N) against
achieved (first to last message received), the achieved and intended tick rates, and how late
each message arrived against its schedule (p50, p99, worst).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks.engine.common import cpu_seconds  # noqa: E402
from benchmarks.engine.run import (  # noqa: E402
    Proc,
    create_database,
    free_port,
    load_market_rows,
    prepare_phase,
    scrape,
    setup_environment,
    start_simulator,
)

TARGET_SHARE = 0.05
ACCOUNTS = ("bench01", "bench02")


def wait_streaming(ports: list[int], per_account: int, timeout_s: float = 300.0) -> None:
    """Until every engine streams its account's instruments and ticks flow."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            states = [scrape(port) for port in ports]
        except OSError:
            states = []
        if states and all(
            s.get("tickerproj_engine_instruments", 0) == per_account
            and s.get("tickerproj_engine_ticks_in_total", 0) > 0
            for s in states
        ):
            return
        time.sleep(1.0)
    raise RuntimeError("the runticker processes did not stream their accounts in time")


class GroupWatcher:
    """One channels-redis member of every group the accounts publish to, drained on a thread
    of this process: the engines serialise and publish every snapshot, as they do when the
    chain pages are open (nobody watching, they skip that work)."""

    def __init__(self, groups: list[str]) -> None:
        self.groups = groups
        self.received = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()

    async def _run(self) -> None:
        from channels.layers import get_channel_layer

        layer = get_channel_layer()
        channel = await layer.new_channel()
        for group in self.groups:
            await layer.group_add(group, channel)
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(layer.receive(channel), timeout=1.0)
            except TimeoutError:
                continue
            self.received += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def published_groups(market, per_account: int) -> list[str]:
    from streaming.schema import chain_group, underlying_group
    from subscriptions.models import Subscription

    subscribed = set(Subscription.objects.values_list("instrument_id", flat=True))
    groups = set()
    for r in market.instruments:
        if r["instrument_token"] in subscribed and r["instrument_type"] in ("CE", "PE"):
            groups.add(chain_group(r["name"], r["expiry"]))
            groups.add(underlying_group(r["name"]))
    return sorted(groups)


def set_recording(label: str, on: bool) -> None:
    from accounts.models import KiteAccount
    from accounts.services import account_save

    account = KiteAccount.objects.get(label=label)
    account.record_frames = on
    account_save(account=account)


def measure(engines: dict[str, Proc], ports: dict[str, int], seconds: float) -> dict[str, dict]:
    before = {k: (cpu_seconds(p.pid), scrape(ports[k])) for k, p in engines.items()}
    time.sleep(seconds)
    after = {k: (cpu_seconds(p.pid), scrape(ports[k])) for k, p in engines.items()}
    out = {}
    for k in engines:
        (c0, m0), (c1, m1) = before[k], after[k]
        ticks = m1["tickerproj_engine_ticks_in_total"] - m0["tickerproj_engine_ticks_in_total"]
        out[k] = {
            "cpu_s": c1 - c0,
            "ticks": ticks,
            "recorder_cpu_s": m1.get("tickerproj_engine_recorder_cpu_seconds_total", 0.0)
            - m0.get("tickerproj_engine_recorder_cpu_seconds_total", 0.0),
            "recorded": m1.get("tickerproj_engine_recorded_frames_total", 0.0)
            - m0.get("tickerproj_engine_recorded_frames_total", 0.0),
            "dropped": m1.get("tickerproj_engine_recording_dropped_frames_total", 0.0)
            - m0.get("tickerproj_engine_recording_dropped_frames_total", 0.0),
        }
    return out


def report_window(n: int, seconds: float, result: dict[str, dict], recording: str) -> None:
    print(f"  window {n} ({seconds:.0f} s), {recording} recording:")
    for label, r in result.items():
        per_tick_us = r["cpu_s"] / max(r["ticks"], 1) * 1e6
        role = "recording on " if label == recording else "recording off"
        print(f"    {label} {role}: {r['ticks'] / seconds:8,.0f} ticks/s, CPU "
              f"{r['cpu_s'] / seconds * 100:5.1f} % of a core, {per_tick_us:6.2f} us/tick, "
              f"recorder thread {r['recorder_cpu_s'] / seconds * 100:4.2f} %, frames recorded "
              f"{r['recorded']:,.0f}, dropped {r['dropped']:,.0f}")


def recording_phase(args, env, logdir: Path, recordings: Path) -> Path:
    from streaming.market import SyntheticMarket

    market = SyntheticMarket(seed=0, expiries=3, strikes_each_side=args.strikes_each_side,
                             extra_underlyings=args.extra_underlyings)
    load_market_rows(market)
    _plan, _sample, total = prepare_phase(market, accounts=2, per_account=args.per_account,
                                          clients=1)
    assert total == 2 * args.per_account, f"the market holds only {total} instruments"
    watcher = GroupWatcher(published_groups(market, args.per_account)) if args.watch else None
    print(f"  groups watched: {len(watcher.groups) if watcher else 0} (--no-watch: none)",
          flush=True)
    no_sample = logdir / "sample.npy"  # the simulator's latency signatures are not needed
    np.save(no_sample, np.zeros(0, dtype=np.int64))
    sim, ws_url, http_url = start_simulator(args, env, logdir, 2, no_sample, logdir / "steps.npz")
    penv = {**env, "KITE_WS_URL": ws_url, "KITE_API_ROOT": http_url,
            "TICKER_RECORDING_DIR": str(recordings)}
    ports = {label: free_port() for label in ACCOUNTS}
    engines = {
        label: Proc(f"runticker-{label}",
                    [sys.executable, "manage.py", "runticker", "--no-mock", "--accounts", label,
                     "--metrics-port", str(ports[label])], penv, logdir)
        for label in ACCOUNTS
    }
    try:
        set_recording(ACCOUNTS[1], True)
        t0 = time.monotonic()
        wait_streaming(list(ports.values()), args.per_account)
        print(f"both runticker processes streaming {args.per_account} instruments after "
              f"{time.monotonic() - t0:.1f} s; warm-up {args.warmup_s:.0f} s", flush=True)
        time.sleep(args.warmup_s)
        load_before = os.getloadavg()[0]
        first = measure(engines, ports, args.seconds)
        report_window(1, args.seconds, first, ACCOUNTS[1])
        first_files = sorted(recordings.rglob("*.tkrec"))
        set_recording(ACCOUNTS[1], False)
        set_recording(ACCOUNTS[0], True)
        time.sleep(args.warmup_s)  # the reload, and the new recorder thread settled
        second = measure(engines, ports, args.seconds)
        report_window(2, args.seconds, second, ACCOUNTS[0])
        load_after = os.getloadavg()[0]
    finally:
        for proc in engines.values():
            proc.stop()
        sim.send_signal(15)
        sim.wait(timeout=30)
        if watcher is not None:
            watcher.stop()
            print(f"  snapshot messages received by the watcher: {watcher.received:,}")

    def per_tick(r):
        return r["cpu_s"] / max(r["ticks"], 1)

    on = (per_tick(first[ACCOUNTS[1]]) + per_tick(second[ACCOUNTS[0]])) / 2
    off = (per_tick(first[ACCOUNTS[0]]) + per_tick(second[ACCOUNTS[1]])) / 2
    share = (on - off) / on
    thread = (first[ACCOUNTS[1]]["recorder_cpu_s"] + second[ACCOUNTS[0]]["recorder_cpu_s"]) / (
        first[ACCOUNTS[1]]["cpu_s"] + second[ACCOUNTS[0]]["cpu_s"]
    )
    files = sorted(recordings.rglob("*.tkrec"))
    size = sum(p.stat().st_size for p in files)
    print(f"  CPU per tick, both windows: recording off {off * 1e6:.2f} us, on {on * 1e6:.2f} us "
          f"-> recording costs {share * 100:+.1f} % of runticker's CPU "
          f"(target <= {TARGET_SHARE * 100:.0f} %: {'met' if share <= TARGET_SHARE else 'NOT met'})")
    print(f"  recorder thread alone: {thread * 100:.2f} % of the recording process's CPU")
    print(f"  recordings: {len(files)} files, {size / 1e6:.1f} MB; load average "
          f"{load_before:.1f} -> {load_after:.1f}")
    return first_files


async def receive(ws_url: str, key: str, token: str) -> list[tuple[float, int, int]]:
    """(receive time, packets, bytes) of every message but the simulator's own heartbeats."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    got = []
    async with connect(f"{ws_url}?api_key={key}&access_token={token}", max_size=None,
                       compression=None) as ws:
        await ws.send('{"a": "subscribe", "v": [256265]}')
        try:
            while True:
                message = await ws.recv()
                now = time.monotonic()
                if isinstance(message, bytes):
                    if len(message) == 1:
                        continue
                    got.append((now, int.from_bytes(message[:2], "big"), len(message)))
                else:
                    got.append((now, 0, len(message)))
        except ConnectionClosed:
            return got


def replay_phase(args, env, logdir: Path, files: list[Path]) -> None:
    from streaming.sim.replay import ReplaySource

    source = ReplaySource(files)
    schedule = [(ns, message) for ns, message in source.messages()
                if not (isinstance(message, bytes) and len(message) == 1)]
    source.close()
    recorded_s = (schedule[-1][0] - schedule[0][0]) / 1e9
    packets = sum(int.from_bytes(m[:2], "big") for _, m in schedule if isinstance(m, bytes))
    print(f"\n== replay at --speed {args.speed:g}: {len(files)} files, {len(schedule):,} "
          f"messages, {packets:,} ticks over {recorded_s:.1f} s recorded "
          f"({packets / recorded_s:,.0f} ticks/s)", flush=True)
    raw = sum(len(m) for _, m in schedule)
    stored = sum(p.stat().st_size for p in files)
    print(f"  recording: {raw / 1e6:.1f} MB of frames in {stored / 1e6:.1f} MB of files "
          f"(ratio {raw / stored:.2f})")
    proc = Proc("replay", [sys.executable, "manage.py", "replay", *map(str, files), "--speed",
                           str(args.speed), "--port", "0", "--api-key", "bench",
                           "--access-token", "bench-token"], env, logdir)
    log_path = logdir / "replay.log"
    deadline = time.monotonic() + 120
    while not (found := re.search(r"KITE_WS_URL=(\S+)", log_path.read_text())):
        if time.monotonic() > deadline or proc.p.poll() is not None:
            raise RuntimeError(f"replay did not start (see {log_path})")
        time.sleep(0.2)
    got = asyncio.run(receive(found.group(1), "bench", "bench-token"))
    proc.p.wait(timeout=60)
    proc.stop()
    summary = re.search(r"replayed .*", log_path.read_text())
    assert len(got) == len(schedule), f"received {len(got)} of {len(schedule)} messages"
    first_at = got[0][0]
    late_ms = np.array([
        (at - (first_at + (ns - schedule[0][0]) / 1e9 / args.speed)) * 1000
        for (at, _, _), (ns, _) in zip(got, schedule, strict=True)
    ])
    intended_s = recorded_s / args.speed
    achieved_s = got[-1][0] - first_at
    print(f"  intended {intended_s:.2f} s, achieved {achieved_s:.2f} s "
          f"({intended_s / achieved_s * 100:.1f} % of the intended rate): "
          f"{packets / achieved_s:,.0f} ticks/s and {sum(b for _, _, b in got) / achieved_s / 1e6:.1f}"
          f" MB/s received against {packets / intended_s:,.0f} ticks/s intended")
    print(f"  lateness against the schedule: p50 {np.percentile(late_ms, 50):.1f} ms, "
          f"p99 {np.percentile(late_ms, 99):.1f} ms, worst {late_ms.max():.1f} ms")
    print(f"  the command: {summary.group(0) if summary else '(no summary)'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="each measured window")
    parser.add_argument("--warmup-s", type=float, default=10.0)
    parser.add_argument("--speed", type=float, default=10.0)
    parser.add_argument("--per-account", type=int, default=9000)
    parser.add_argument("--interval-ms", type=float, default=1000.0)
    parser.add_argument("--strikes-each-side", type=int, default=50)
    parser.add_argument("--extra-underlyings", type=int, default=28)
    parser.add_argument("--database", default="bench_replay")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/6")
    parser.add_argument("--flush-interval-ms", type=int, default=100)
    parser.add_argument("--no-watch", dest="watch", action="store_false",
                        help="nobody watches the groups: the engines publish nothing")
    args = parser.parse_args()
    env = setup_environment(args)
    os.environ["CHANNEL_LAYER_PREFIX"] = env["CHANNEL_LAYER_PREFIX"]  # the services' notices
    logdir = Path(tempfile.mkdtemp(prefix="bench-replay-"))
    recordings = logdir / "recordings"
    print(f"logs and recordings in {logdir}; load average {os.getloadavg()[0]:.1f}", flush=True)
    create_database(args.database, env)
    import django

    django.setup()
    print(f"\n== recording: 2 runticker processes x 1 account x {args.per_account} instruments, "
          f"every instrument every {args.interval_ms:.0f} ms", flush=True)
    files = recording_phase(args, env, logdir, recordings)
    replay_phase(args, env, logdir, files)


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as exc:
        sys.exit(f"a step failed: {exc}")
