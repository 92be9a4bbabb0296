"""The engine end to end, all real processes on this machine:
Kite simulator -> runticker -> channels-redis -> daphne -> WebSocket clients.

    uv run python benchmarks/engine/run.py                      # both phases, ~4 minutes
    uv run python benchmarks/engine/run.py --phases latency --seconds 20
    uv run python benchmarks/engine/run.py --phases latency --layers redis,pubsub

Phases (each on a fresh set of subscriptions in its own PostgreSQL database):
- throughput: 11 accounts x 9000 instruments (Kite's maximum) in full mode, the simulator
  sending every instrument every second: ~99k ticks/s into one runticker, with Greeks and
  publishing to the groups 200 WebSocket clients watch. Ticks in, snapshots out, flush
  latency, backlog trend (ticks ingested vs offered, event-loop lag first half vs second half),
  runticker's CPU and resident memory at ~100k instruments.
- latency: 1 account x 9000 instruments, 9000 ticks/s, 200 clients: latency from the
  simulator's market step to the client's receipt of the snapshot, p50 and p99.

The service (runticker, the benchmark's own redis-server, daphne) is pinned to one CPU and the
load generators (simulator, clients, probe) to the other with taskset unless --no-pin; each
process's CPU is reported, with runticker's CPU per tick and daphne's per delivered snapshot.
--layers redis,pubsub runs each phase on both channel layers side by side; --stress-cpus N
runs stress-ng beside it; after the window the market stops and every client must converge
to its last state.

Latency is measured by signature (see common.py): the simulator records each step's time
and a signature of every sampled instrument; a client's snapshot is matched to the one step
with that signature. Figures are printed with the CPU use of each process (100 % = one core)
and ratios against the issue's targets and the old service's ~1000 ticks/s (quoted from its
review: it cannot be run here).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks.engine.common import cpu_seconds, find_pids, rss_bytes  # noqa: E402

OLD_SERVICE_TICKS_PER_S = 1000
TARGET_TICKS_PER_S = 100_000
TARGET_P99_MS = 200.0
WINDOW_STRIKES = 10  # each client: 10 strikes either side of the chain's middle, CE and PE
LAYER_PROBE_CHAINS = 20  # the channel-layer probe joins the groups of the first 20 clients


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- set-up --------------------------------------------------------------------------------


def setup_environment(args) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "DATABASE_URL": f"postgres://postgres@127.0.0.1:5432/{args.database}",
            "REDIS_URL": args.redis_url,
            "SECRET_KEY": env.get("SECRET_KEY", "bench-secret-key-not-for-production"),
            "FIELD_ENCRYPTION_KEYS": env.get(
                "FIELD_ENCRYPTION_KEYS", "mm3JPTf9TRR7OBOOigZVYZMNBLNeIIxHivuB6kCvdHE="
            ),
            "CHANNEL_LAYER_PREFIX": f"bench{uuid.uuid4().hex[:8]}",
            "LOG_LEVEL": "WARNING",
            "LOG_JSON": "true",
            "TICKER_HEARTBEAT_INTERVAL_S": "2",
            "TICKER_FLUSH_INTERVAL_MS": str(args.flush_interval_ms),
            "WS_MAX_SUBSCRIPTIONS": "2000",
            # The benchmark's clients are one user on one address: lift the per-user and
            # per-address caps (production defaults 20 / 100 / 120 a minute) above its load.
            "WS_MAX_CONNECTIONS_PER_USER": "5000",
            "WS_MAX_CONNECTIONS_PER_IP": "5000",
            "WS_MAX_CONNECTS_PER_IP_PER_MINUTE": "100000",
            "PYTHONUNBUFFERED": "1",
            "DJANGO_SETTINGS_MODULE": "tickerproj.settings",
        }
    )
    os.environ.update({k: env[k] for k in ("DATABASE_URL", "REDIS_URL", "SECRET_KEY",
                                            "FIELD_ENCRYPTION_KEYS", "LOG_LEVEL")})
    os.environ["DJANGO_SETTINGS_MODULE"] = "tickerproj.settings"
    return env


def create_database(name: str, env: dict[str, str], *, service_repo: Path) -> None:
    import psycopg

    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        c.execute(f'CREATE DATABASE "{name}"')
    subprocess.run([str(service_repo / ".venv" / "bin" / "python"), "manage.py", "migrate",
                    "--noinput", "-v", "0"], cwd=service_repo, env=env, check=True)


def load_market_rows(market) -> None:
    from subscriptions.models import Instrument

    rows = [
        Instrument(
            instrument_token=r["instrument_token"], exchange_token=int(r["exchange_token"]),
            tradingsymbol=r["tradingsymbol"], name=r["name"], last_price=r["last_price"],
            expiry=r["expiry"], strike=r["strike"], tick_size=r["tick_size"],
            lot_size=r["lot_size"], instrument_type=r["instrument_type"],
            segment=r["segment"], exchange=r["exchange"],
        )
        for r in market.instruments
    ]
    Instrument.objects.bulk_create(rows, batch_size=5000)


def prepare_phase(market, *, accounts: int, per_account: int, clients: int):
    """Subscriptions, accounts and an API token for one phase; returns (plan, sample)."""
    from django.contrib.auth import get_user_model

    from accounts.models import ApiToken, KiteAccount
    from accounts.services import account_set_session, apitoken_create
    from streaming.models import AccountLease, EngineHeartbeat
    from streaming.schema import chain_group
    from subscriptions.models import Subscription

    Subscription.objects.all().delete()
    AccountLease.objects.all().delete()
    EngineHeartbeat.objects.all().delete()
    KiteAccount.objects.all().delete()
    ApiToken.objects.all().delete()
    # Whole underlyings (index, futures, every option), as an account streams them in real
    # life, until the accounts are full.
    by_underlying: dict[str, list[int]] = defaultdict(list)
    for r in market.instruments:
        name = r["name"] if r["instrument_type"] != "EQ" else _index_name(market, r)
        by_underlying[name].append(r["instrument_token"])
    tokens: list[int] = []
    for name in sorted(by_underlying, key=lambda n: min(by_underlying[n])):
        tokens.extend(sorted(by_underlying[name]))
    tokens = tokens[: accounts * per_account]
    Subscription.objects.bulk_create(
        [Subscription(instrument_id=t, mode="full") for t in tokens], batch_size=5000
    )
    for i in range(1, accounts + 1):
        account = KiteAccount.objects.create(label=f"bench{i:02d}", api_key=f"bench{i:02d}")
        account_set_session(account=account, access_token=f"tok{i:02d}")
    user, _ = get_user_model().objects.get_or_create(username="bench")
    _token, key = apitoken_create(user=user, name="bench")

    subscribed = set(tokens)
    chains: dict[tuple, list[tuple[float, int]]] = defaultdict(list)
    for r in market.instruments:
        if r["instrument_type"] in ("CE", "PE") and r["instrument_token"] in subscribed:
            chains[(r["name"], r["expiry"])].append((r["strike"], r["instrument_token"]))
    full_keys = [k for k, v in chains.items() if len(v) >= 4 * WINDOW_STRIKES + 2]
    full = [sorted(chains[k]) for k in full_keys]
    plan_clients, layer_groups = [], set()
    for i in range(clients):
        key_chain = full_keys[i % len(full)]
        chain = full[i % len(full)]
        if i < LAYER_PROBE_CHAINS:
            layer_groups.add(chain_group(*key_chain))
        strikes = sorted({s for s, _ in chain})
        mid = len(strikes) // 2
        # Clients sharing a chain look at different windows of it (cycling: 1000 clients
        # share each chain dozens of times).
        shift = (i // len(full)) * 3 % max(1, mid - WINDOW_STRIKES + 1)
        lo = strikes[max(0, mid - WINDOW_STRIKES - shift)]
        hi = strikes[min(len(strikes) - 1, mid + WINDOW_STRIKES - shift)]
        plan_clients.append([t for s, t in chain if lo <= s <= hi])
    sample = np.unique(np.concatenate([np.asarray(c, dtype=np.int64) for c in plan_clients]))
    plan = {"key": key, "clients": plan_clients, "layer_groups": sorted(layer_groups)}
    return plan, sample, len(tokens)


def _index_name(market, row) -> str:
    """The derivatives' name of an index row ("NIFTY 50" -> "NIFTY")."""
    for name in market.underlyings:
        if market.index_token(name) == row["instrument_token"]:
            return name
    return row["name"]


# --- processes -----------------------------------------------------------------------------


def pinned(argv: list[str], cpu: int | None) -> list[str]:
    """``argv`` run on one CPU (taskset execs it: the pid stays the process's own)."""
    return argv if cpu is None else ["taskset", "-c", str(cpu), *argv]


class Proc:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], logdir: Path, *,
                 cpu: int | None = None, cwd: Path = REPO) -> None:
        self.name = name
        self.log = open(logdir / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        self.p = subprocess.Popen(pinned(argv, cpu), cwd=cwd, env=env, stdout=self.log,
                                  stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.p.pid

    def stop(self, timeout_s: float = 30.0) -> int | None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.log.close()
        return self.p.returncode


def start_redis(args, logdir: Path) -> tuple[subprocess.Popen, str]:
    """A private redis-server (no persistence) on the service CPU; returns it and its URL."""
    port = free_port()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--protected-mode", "yes"]
    proc = subprocess.Popen(pinned(argv, args.service_cpu if args.pin else None), cwd=logdir,
                            stdout=open(logdir / "redis.log", "wb"),  # noqa: SIM115
                            stderr=subprocess.STDOUT)
    import redis

    client = redis.Redis(port=port)
    deadline = time.monotonic() + 30
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start (see {logdir / 'redis.log'})") from None
            time.sleep(0.1)
    client.close()
    return proc, f"redis://127.0.0.1:{port}/0"


def start_simulator(args, env, logdir: Path, accounts: int, sample_path: Path, out: Path):
    argv = [sys.executable, "benchmarks/engine/sim.py", "--accounts", str(accounts),
            "--extra-underlyings", str(args.extra_underlyings),
            "--strikes-each-side", str(args.strikes_each_side),
            "--interval-ms", str(args.interval_ms), "--sample", str(sample_path),
            "--out", str(out)]
    argv = pinned(argv, args.load_cpu if args.pin else None)
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=open(logdir / "sim.log", "wb"), text=True)  # noqa: SIM115
    line = proc.stdout.readline()
    if not line.startswith("READY"):
        proc.kill()
        raise RuntimeError(f"simulator did not start: {line!r} (see {logdir / 'sim.log'})")
    _, ws_url, http_url = line.split()
    return proc, ws_url, http_url


def scrape(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tickerproj_engine_flush_seconds_bucket":
                out[f"flush_le_{sample.labels['le']}"] = sample.value
            elif sample.name == "tickerproj_engine_publish_seconds_bucket":
                out[f"publish_le_{sample.labels['le']}"] = sample.value
            elif sample.name == "tickerproj_engine_tick_to_publish_seconds_bucket":
                out[f"inengine_le_{sample.labels['le']}"] = sample.value
            else:
                out[sample.name] += sample.value
    return dict(out)


def wait_engine_ready(expected: int, accounts: int, timeout_s: float = 300.0) -> None:
    from streaming.models import EngineHeartbeat

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        hb = EngineHeartbeat.objects.order_by("-updated_at").first()
        if hb is not None:
            st = hb.state
            streaming = [a for a in st.get("accounts", {}).values() if a.get("state") == "streaming"]
            if st.get("streamed_count") == expected and len(streaming) == accounts:
                return
        time.sleep(1.0)
    raise RuntimeError("runticker did not stream every account in time")


# --- analysis ------------------------------------------------------------------------------


def histogram_percentile(before: dict, after: dict, q: float, name: str) -> float | None:
    prefix = f"{name}_le_"
    bounds = sorted(
        (float(k[len(prefix):]), after[k] - before.get(k, 0.0))
        for k in after if k.startswith(prefix)
    )
    total = bounds[-1][1] if bounds else 0
    if total <= 0:
        return None
    target = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in bounds:
        if count >= target:
            if bound == float("inf"):
                return prev_bound
            frac = (target - prev_count) / max(count - prev_count, 1e-9)
            return prev_bound + frac * (bound - prev_bound)
        prev_bound, prev_count = bound, count
    return prev_bound


def latencies_ms(
    steps_file: Path, client_files: list[Path], *, since: float
) -> tuple[np.ndarray, int, int]:
    """Step-to-receipt latencies of ticks stamped after ``since`` (the recording start)."""
    steps = np.load(steps_file)
    tokens, times, sigs = steps["tokens"], steps["times"], steps["signatures"]
    col = {int(t): j for j, t in enumerate(tokens)}
    index: dict[tuple[int, int], list[int]] = defaultdict(list)
    for k in range(len(times)):
        for j, s in enumerate(sigs[k].tolist()):
            index[(j, s)].append(k)
    out, unmatched, ambiguous = [], 0, 0
    for path in client_files:
        rec = np.load(path)
        # The first receipt of a tick per connection: a later snapshot with the same tick
        # fields is a re-publication (new Greeks when the chain's forward moved), not the
        # tick's own latency.
        seen: set[tuple[int, int, int]] = set()
        for conn, token, sig, t in zip(rec["conns"].tolist(), rec["tokens"].tolist(),
                                       rec["signatures"].tolist(), rec["times"].tolist(),
                                       strict=True):
            j = col.get(token)
            if j is None:
                continue  # not a sampled instrument (the layer probe sees whole chains)
            if (conn, token, sig) in seen:
                continue
            seen.add((conn, token, sig))
            ks = index.get((j, sig), [])
            ks = [k for k in ks if times[k] <= t]
            if ks and times[ks[-1]] < since:
                continue  # first received before recording began: not its first receipt
            if not ks:
                unmatched += 1
            elif len(ks) > 1:
                ambiguous += 1
            else:
                out.append((t - times[ks[0]]) * 1000.0)
    return np.asarray(out), unmatched, ambiguous


# --- a phase -------------------------------------------------------------------------------


def convergence(steps_file: Path, client_files: list[Path], plan_clients: list[list[int]],
                per_proc: int) -> tuple[int, int]:
    """(pairs holding the final state, pairs) over every (connection, subscribed instrument):
    after the market stopped, each client's last snapshot of each instrument should be the
    last step's."""
    steps = np.load(steps_file)
    if not len(steps["times"]):
        return 0, 0
    final = {int(t): int(sig) for t, sig in zip(steps["tokens"], steps["signatures"][-1], strict=True)}
    held, pairs = 0, 0
    for i, path in enumerate(client_files):
        rec = np.load(path)
        last = {(int(c), int(t)): int(sig) for c, t, sig in
                zip(rec["last_conns"], rec["last_tokens"], rec["last_signatures"], strict=True)}
        for conn, tokens in enumerate(plan_clients[i * per_proc:(i + 1) * per_proc]):
            for token in tokens:
                pairs += 1
                held += last.get((conn, token)) == final.get(token)
    return held, pairs


def run_phase(name: str, args, env, market, *, accounts: int, logdir: Path, layer: str,
              redis_pid: int | None) -> dict:
    print(f"\n== phase {name} ({layer} layer): {accounts} account(s) x {args.per_account} "
          f"instruments, {args.clients} WebSocket clients on {args.web_procs} daphne process(es), "
          f"{args.seconds:.0f} s measured"
          + (f", stress-ng --cpu {args.stress_cpus} beside it" if args.stress_cpus else "")
          + ("; service pinned to CPU "
             f"{args.service_cpu}, load generators to CPU {args.load_cpu}" if args.pin
             else "; nothing pinned"), flush=True)
    plan, sample, total = prepare_phase(
        market, accounts=accounts, per_account=args.per_account, clients=args.clients
    )
    work = Path(tempfile.mkdtemp(prefix=f"bench-{name}-{layer}-", dir=logdir))
    sample_path, steps_path, plan_path = work / "sample.npy", work / "steps.npz", work / "plan.json"
    np.save(sample_path, sample)
    plan_path.write_text(json.dumps(plan))
    service_cpu = args.service_cpu if args.pin else None
    load_cpu = args.load_cpu if args.pin else None
    env = {**env, "CHANNEL_LAYER_BACKEND": layer}
    sim, ws_url, http_url = start_simulator(args, env, work, accounts, sample_path, steps_path)
    metrics_port = free_port()
    web_ports = [free_port() for _ in range(args.web_procs)]
    penv = {**env, "KITE_WS_URL": ws_url, "KITE_API_ROOT": http_url}
    service_python = str(args.service_repo / ".venv" / "bin" / "python")
    engine = Proc("runticker", [service_python, "manage.py", "runticker", "--no-mock",
                                "--metrics-port", str(metrics_port)], penv, work,
                  cpu=service_cpu, cwd=args.service_repo)
    daphnes = [
        Proc(f"daphne{i}", [service_python, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port),
                            "tickerproj.asgi:application"], penv, work,
             cpu=service_cpu, cwd=args.service_repo)
        for i, port in enumerate(web_ports)
    ]
    clients: list[Proc] = []
    stress: Proc | None = None
    try:
        t0 = time.monotonic()
        wait_engine_ready(total, accounts)
        print(f"runticker streaming {total} instruments after {time.monotonic() - t0:.1f} s",
              flush=True)
        record_from = time.time() + args.warmup_s
        until = record_from + args.seconds
        settle_until = until + args.settle_s
        if args.stress_cpus:
            stress = Proc("stress-ng", ["stress-ng", "--cpu", str(args.stress_cpus), "--timeout",
                                        f"{int(args.warmup_s + args.seconds + 5)}s"], penv, work)
        per_proc = -(-args.clients // args.client_procs)
        for i in range(args.client_procs):
            first = i * per_proc
            count = min(per_proc, args.clients - first)
            if count <= 0:
                break
            clients.append(Proc(f"client{i}", [
                sys.executable, "benchmarks/engine/client.py",
                "--url", f"ws://127.0.0.1:{web_ports[i % len(web_ports)]}/ws/v1/",
                "--plan", str(plan_path),
                "--first", str(first), "--count", str(count), "--record-from", str(record_from),
                "--until", str(until), "--settle-until", str(settle_until),
                "--out", str(work / f"client{i}.npz")], penv, work, cpu=load_cpu))
        clients.append(Proc("layerprobe", [
            sys.executable, "benchmarks/engine/client.py", "--layer", "--plan", str(plan_path),
            "--record-from", str(record_from), "--until", str(until),
            "--out", str(work / "layerprobe.npz")], penv, work, cpu=load_cpu))
        while time.time() < record_from:
            time.sleep(0.2)
        pids = {"simulator": [sim.pid], "runticker": [engine.pid],
                "daphne": [d.pid for d in daphnes],
                "redis": [redis_pid] if redis_pid else find_pids("redis-server"),
                "clients": [c.pid for c in clients[:-1]], "probe": [clients[-1].pid]}
        cpu0 = {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}
        m0, w0 = scrape(metrics_port), time.monotonic()
        samples = []
        while time.time() < until:
            time.sleep(1.0)
            m = scrape(metrics_port)
            samples.append(m.get("tickerproj_engine_loop_lag_seconds", 0.0))
        m1, w1 = scrape(metrics_port), time.monotonic()
        cpu1 = {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}
        # The market stands still from here: the clients must converge to its last step.
        sim.send_signal(signal.SIGUSR1)
        rss = rss_bytes(engine.pid)
        for c in clients:
            c.p.wait(timeout=60 + args.settle_s)
    finally:
        for c in clients:
            c.stop()
        if stress is not None:
            stress.stop()
        engine_rc = engine.stop()
        for d in daphnes:
            d.stop()
        sim.send_signal(signal.SIGTERM)
        sim.wait(timeout=60)
    wall = w1 - w0
    cpu_s = {k: cpu1[k] - cpu0[k] for k in cpu0}
    cpu = {k: v / wall * 100.0 for k, v in cpu_s.items()}
    ticks = m1["tickerproj_engine_ticks_in_total"] - m0["tickerproj_engine_ticks_in_total"]
    snaps_out = (m1["tickerproj_engine_snapshots_out_total"]
                 - m0["tickerproj_engine_snapshots_out_total"]) / wall
    client_files = [work / f"client{i}.npz" for i in range(len(clients) - 1)]
    missing = [f.name for f in client_files if not f.exists()]
    client_files = [f for f in client_files if f.exists()]
    probe_lat, _, _ = latencies_ms(steps_path, [work / "layerprobe.npz"], since=record_from)
    delivered = sum(int(np.load(f)["measured"]) for f in client_files)
    connected = sum(int(np.load(f)["connected"]) for f in client_files)
    held, pairs = convergence(steps_path, client_files, plan["clients"], per_proc) if not missing \
        else (0, sum(len(c) for c in plan["clients"]))
    lat, unmatched, ambiguous = latencies_ms(steps_path, client_files, since=record_from)
    half = len(samples) // 2
    lag = np.asarray(samples) * 1000.0
    result = {
        "phase": name,
        "layer": layer,
        "pinned": bool(args.pin),
        "stress_cpus": args.stress_cpus,
        "web_procs": args.web_procs,
        "instruments": total,
        "accounts": accounts,
        "clients": args.clients,
        "clients_connected": connected,
        "client_files_missing": missing,
        "ticks_in_per_s": ticks / wall,
        "snapshots_out_per_s": snaps_out,
        "client_snapshots_per_s": delivered / wall,
        "flush_ms_p50": (histogram_percentile(m0, m1, 0.5, "flush") or 0.0) * 1000.0,
        "flush_ms_p99": (histogram_percentile(m0, m1, 0.99, "flush") or 0.0) * 1000.0,
        "publish_ms_p50": (histogram_percentile(m0, m1, 0.5, "publish") or 0.0) * 1000.0,
        "publish_ms_p99": (histogram_percentile(m0, m1, 0.99, "publish") or 0.0) * 1000.0,
        "in_engine_ms_p50": (histogram_percentile(m0, m1, 0.5, "inengine") or 0.0) * 1000.0,
        "in_engine_ms_p99": (histogram_percentile(m0, m1, 0.99, "inengine") or 0.0) * 1000.0,
        "loop_lag_ms_first_half": float(lag[:half].mean()) if half else None,
        "loop_lag_ms_second_half": float(lag[half:].mean()) if half else None,
        "loop_lag_ms_p99": float(np.percentile(lag, 99)) if len(lag) else None,
        "loop_lag_ms_max": float(lag.max()) if len(lag) else None,
        "offered_per_s": total / (args.interval_ms / 1000.0),
        "latency_ms_p50": float(np.percentile(lat, 50)) if len(lat) else None,
        "latency_ms_p99": float(np.percentile(lat, 99)) if len(lat) else None,
        "latency_samples": len(lat),
        "layer_latency_ms_p50": float(np.percentile(probe_lat, 50)) if len(probe_lat) else None,
        "layer_latency_ms_p99": float(np.percentile(probe_lat, 99)) if len(probe_lat) else None,
        "latency_unmatched": unmatched,
        "latency_ambiguous": ambiguous,
        "converged_pairs": held,
        "pairs": pairs,
        "runticker_rss_mb": rss / 2**20,
        "cpu_percent": cpu,
        "runticker_us_per_tick": cpu_s["runticker"] / ticks * 1e6 if ticks else None,
        "daphne_us_per_snapshot": cpu_s["daphne"] / delivered * 1e6 if delivered else None,
        "runticker_exit": engine_rc,
        "load_average": os.getloadavg(),
        "logs": str(work),
    }
    report(result)
    return result


def report(r: dict) -> None:
    def f(x, spec=",.0f"):
        return "n/a" if x is None else format(x, spec)

    print(f"  instruments streamed      {r['instruments']:,} over {r['accounts']} account(s); "
          f"{r['clients_connected']} clients connected")
    print(f"  ticks in                  {f(r['ticks_in_per_s'])}/s  "
          f"({r['ticks_in_per_s'] / TARGET_TICKS_PER_S:.2f}x the 100k target, "
          f"{r['ticks_in_per_s'] / OLD_SERVICE_TICKS_PER_S:.0f}x the old service's ~1000)")
    print(f"  snapshots out (engine)    {f(r['snapshots_out_per_s'])}/s to the channel layer; "
          f"clients received {f(r['client_snapshots_per_s'])}/s")
    print(f"  flush (with changes)      p50 {f(r['flush_ms_p50'], '.1f')} ms, "
          f"p99 {f(r['flush_ms_p99'], '.1f')} ms compute; publish p50 "
          f"{f(r['publish_ms_p50'], '.1f')} ms, p99 {f(r['publish_ms_p99'], '.1f')} ms "
          "(histogram-interpolated)")
    print(f"  backlog                   offered {f(r['offered_per_s'])} ticks/s, ingested "
          f"{r['ticks_in_per_s'] / r['offered_per_s']:.1%}; event-loop lag (worst per second) "
          f"{f(r['loop_lag_ms_first_half'], '.1f')} ms (first half) -> "
          f"{f(r['loop_lag_ms_second_half'], '.1f')} ms (second half), max "
          f"{f(r['loop_lag_ms_max'], '.1f')} ms")
    p99 = r["latency_ms_p99"]
    print(f"  step -> client latency    p50 {f(r['latency_ms_p50'], '.1f')} ms, "
          f"p99 {f(p99, '.1f')} ms"
          + (f" ({p99 / TARGET_P99_MS:.2f}x the 200 ms target)" if p99 else "")
          + f"; {r['latency_samples']:,} samples, {r['latency_unmatched']:,} unmatched, "
          f"{r['latency_ambiguous']:,} ambiguous")
    print(f"  frame in -> published     p50 {f(r['in_engine_ms_p50'], '.1f')} ms, "
          f"p99 {f(r['in_engine_ms_p99'], '.1f')} ms (oldest tick of each flush, in runticker)")
    print(f"  step -> channel layer     p50 {f(r['layer_latency_ms_p50'], '.1f')} ms, "
          f"p99 {f(r['layer_latency_ms_p99'], '.1f')} ms (a channels-redis member, no daphne)")
    print(f"  runticker RSS             {r['runticker_rss_mb']:.0f} MB")
    print("  CPU (100% = one core)     " + ", ".join(
        f"{k} {v:.0f}%" for k, v in r["cpu_percent"].items()))
    print(f"  CPU cost                  runticker {f(r['runticker_us_per_tick'], '.1f')} us per "
          f"tick in; daphne {f(r['daphne_us_per_snapshot'], '.1f')} us per snapshot delivered "
          "to a client")
    ingested = r["ticks_in_per_s"] / r["offered_per_s"]
    print(f"  degradation               ingested {ingested:.1%} "
          f"({'ok' if ingested >= 0.995 else 'BELOW'} the 99.5% floor); event-loop lag p99 "
          f"{f(r['loop_lag_ms_p99'], '.1f')} ms, max {f(r['loop_lag_ms_max'], '.1f')} ms; "
          f"converged {r['converged_pairs']:,} of {r['pairs']:,} (client, instrument) pairs "
          "to the last market step after it stopped"
          + (f"; MISSING client recordings {r['client_files_missing']}"
             if r["client_files_missing"] else ""))


def compare_layers(results: list[dict]) -> None:
    """The same phase on both layers, side by side, with pubsub / redis ratios."""
    by_phase: dict[str, dict[str, dict]] = defaultdict(dict)
    for r in results:
        by_phase[r["phase"]][r["layer"]] = r
    rows = [("step -> client p50 ms", "latency_ms_p50"), ("step -> client p99 ms", "latency_ms_p99"),
            ("step -> channel layer p99 ms", "layer_latency_ms_p99"),
            ("publish p99 ms", "publish_ms_p99"),
            ("daphne us / snapshot", "daphne_us_per_snapshot"),
            ("runticker us / tick", "runticker_us_per_tick")]
    for phase, layers in by_phase.items():
        if not {"redis", "pubsub"} <= set(layers):
            continue
        a, b = layers["redis"], layers["pubsub"]
        print(f"\n== layers side by side, phase {phase}: RedisChannelLayer + bulk Lua sender vs "
              "RedisPubSubChannelLayer + pipelined PUBLISH")
        print(f"  {'':30} {'redis':>10} {'pubsub':>10} {'pubsub/redis':>13}")
        for label, key in rows:
            x, y = a.get(key), b.get(key)
            ratio = f"{y / x:.2f}x" if x and y else "n/a"
            print(f"  {label:30} {'n/a' if x is None else format(x, '.1f'):>10} "
                  f"{'n/a' if y is None else format(y, '.1f'):>10} {ratio:>13}")
        for r in (a, b):
            print(f"  {r['layer']:6} CPU: " + ", ".join(
                f"{k} {v:.0f}%" for k, v in r["cpu_percent"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--phases", default="throughput,latency")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warmup-s", type=float, default=10.0)
    parser.add_argument("--settle-s", type=float, default=5.0,
                        help="after the measured window the market stops; clients have this "
                             "long to converge to its last state")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--client-procs", type=int, default=4)
    parser.add_argument("--web-procs", type=int, default=1, help="daphne processes")
    parser.add_argument("--layers", default="pubsub",
                        help="CHANNEL_LAYER_BACKEND to run each phase on, comma-separated: pubsub "
                             "(RedisPubSubChannelLayer, the default) and/or redis "
                             "(RedisChannelLayer); both prints them side by side")
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                        help="pin the service (runticker, redis, daphne) to --service-cpu and "
                             "the load generators (simulator, clients, probe) to --load-cpu")
    parser.add_argument("--service-cpu", type=int, default=1)
    parser.add_argument("--load-cpu", type=int, default=0)
    parser.add_argument("--private-redis", action=argparse.BooleanOptionalAction, default=True,
                        help="start a redis-server of the benchmark's own (pinned with the "
                             "service); --no-private-redis uses --redis-url")
    parser.add_argument("--stress-cpus", type=int, default=0,
                        help="run stress-ng --cpu N beside the benchmark (graceful degradation)")
    parser.add_argument("--service-repo", type=Path, default=REPO,
                        help="run runticker and daphne from this checkout (its .venv): the "
                             "same load against another version")
    parser.add_argument("--flush-interval-ms", type=int, default=100,
                        help="TICKER_FLUSH_INTERVAL_MS (the setting's default is 100)")
    parser.add_argument("--accounts", type=int, default=11)
    parser.add_argument("--per-account", type=int, default=9000)
    parser.add_argument("--interval-ms", type=float, default=1000.0)
    parser.add_argument("--extra-underlyings", type=int, default=163)
    parser.add_argument("--strikes-each-side", type=int, default=50)
    parser.add_argument("--database", default="bench_engine_runtime")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/6")
    parser.add_argument("--logdir", default="")
    args = parser.parse_args()
    args.service_repo = args.service_repo.resolve()
    layers = [x.strip() for x in args.layers.split(",") if x.strip()]
    if not set(layers) <= {"redis", "pubsub"}:
        parser.error(f"--layers: redis and/or pubsub, got {args.layers!r}")
    logdir = Path(args.logdir or tempfile.mkdtemp(prefix="bench-engine-"))
    logdir.mkdir(parents=True, exist_ok=True)
    redis_proc = None
    if args.private_redis:
        redis_proc, args.redis_url = start_redis(args, logdir)
    try:
        env = setup_environment(args)
        print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; "
              f"service from {args.service_repo}; logs in {logdir}", flush=True)
        create_database(args.database, env, service_repo=args.service_repo)
        import django

        django.setup()
        from streaming.market import SyntheticMarket

        market = SyntheticMarket(seed=0, expiries=3, strikes_each_side=args.strikes_each_side,
                                 extra_underlyings=args.extra_underlyings)
        load_market_rows(market)
        print(f"market: {len(market.instruments):,} instruments", flush=True)
        results = []
        phases = [p.strip() for p in args.phases.split(",") if p.strip()]
        for phase in phases:
            accounts = args.accounts if phase == "throughput" else 1
            for layer in layers:
                results.append(run_phase(phase, args, env, market, accounts=accounts,
                                         logdir=logdir, layer=layer,
                                         redis_pid=redis_proc.pid if redis_proc else None))
        compare_layers(results)
        (logdir / "results.json").write_text(json.dumps(results, indent=2))
        print(f"\nload average at end {os.getloadavg()[0]:.2f}; results in {logdir / 'results.json'}")
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(timeout=30)


if __name__ == "__main__":
    main()
