"""The production layout as real processes on private instances, for the fault scenarios.

``with Deployment.up() as dep:`` starts, in a temp dir: its own PostgreSQL 15 cluster
(``initdb`` as the ``postgres`` OS user) and ``redis-server`` on free ports, the Kite
simulator (in this process, on its own thread and loop, so ``dep.sim(...)`` reaches its fault
switches), the TCP proxies every product process goes through, daphne, two runtickers
(``--no-mock``, ``MARKET_HOURS_ALWAYS_OPEN``), a Celery worker and beat, 50 acknowledging
WebSocket clients and the 5 ms probe. Leaving the block (also on Ctrl-C or a failure) stops
every process; each process also gets a parent-death signal, so none outlives a killed runner.
The logs of every process stay in the run's temp dir (``dep.run_dir``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import inspect
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PG_BIN = Path("/usr/lib/postgresql/15/bin")
DB_NAME = "tickerproj"
#: Ports are drawn from here (below the kernel's ephemeral range, away from the usual
#: services) and checked free before use.
PORT_RANGE = (21000, 29999)
START_TIMEOUT_S = 120.0

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent(sig: int) -> Callable[[], None]:
    """preexec_fn: the child gets ``sig`` when the runner dies (even by kill -9)."""

    def preexec() -> None:
        _libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)

    return preexec


#: The parent-death signal fires when the THREAD that forked the child ends, so every process
#: is forked by this one thread, which lives as long as the runner (a scenario may restart a
#: process from a thread of its own that then ends).
_SPAWNER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="faults-spawner")


def spawn(argv: list[str], **kwargs: Any) -> subprocess.Popen:
    return _SPAWNER.submit(subprocess.Popen, argv, **kwargs).result()


#: How long a reset waits for the deployment to recover by itself before it steps in.
RECOVERY_WAIT_S = 60.0


class FleetNotFresh(TimeoutError):
    """The processes are healthy but some fleet client receives nothing."""


class PortPicker:
    """Free ports that no other part of this deployment has taken."""

    def __init__(self) -> None:
        self._taken: set[int] = set()
        self._random = random.Random()

    def take(self) -> int:
        for _ in range(500):
            port = self._random.randint(*PORT_RANGE)
            if port in self._taken or not _port_free(port):
                continue
            self._taken.add(port)
            return port
        raise RuntimeError(f"no free port in {PORT_RANGE}")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    with socket.socket() as s:  # nothing listening on it either (a wildcard bind elsewhere)
        return s.connect_ex(("127.0.0.1", port)) != 0


def wait_for(predicate: Callable[[], object], *, timeout_s: float, what: str,
             interval_s: float = 0.05, alive: Callable[[], bool] | None = None) -> Any:
    """Poll until ``predicate`` is true (returned); fail at the deadline or when ``alive``
    says the process waited on has died."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if alive is not None and not alive():
            raise RuntimeError(f"{what}: the process exited")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout_s} s")
        time.sleep(interval_s)


class Proc:
    """One product process: started in its own session, output appended to ``log_path``.

    ``ready``: a predicate that is true once the process serves (``start`` waits on it).
    ``before_start``: run before each start (e.g. clear a metrics directory).
    """

    def __init__(self, name: str, argv: list[str], *, env: dict[str, str], cwd: Path,
                 log_path: Path, user: str | None = None, stop_signal: int = signal.SIGTERM,
                 death_signal: int = signal.SIGTERM, ready: Callable[[], object] | None = None,
                 before_start: Callable[[], None] | None = None,
                 clear_old_groups_on_start: bool = False) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.log_path = log_path
        self.user = user
        self.stop_signal = stop_signal
        self.death_signal = death_signal
        self.ready = ready
        self.before_start = before_start
        self.popen: subprocess.Popen | None = None
        self.starts = 0
        #: Every process group this Proc started: what a kill -9 left behind (prefork
        #: children, backends) is killed with them at the end.
        self.groups: set[int] = set()
        self.clear_old_groups_on_start = clear_old_groups_on_start

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self, *, timeout_s: float = START_TIMEOUT_S, wait_ready: bool = True) -> float:
        """Start (if not running) and wait until ready; returns the seconds it took."""
        began = time.monotonic()
        if not self.alive():
            if self.clear_old_groups_on_start:
                self.kill_groups()
            if self.before_start is not None:
                self.before_start()
            with self.log_path.open("ab") as log:
                log.write(f"\n===== faults: start #{self.starts + 1} of {self.name} at "
                          f"{time.strftime('%H:%M:%S')} =====\n".encode())
                log.flush()
                self.popen = spawn(
                    self.argv, env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True, user=self.user,
                    preexec_fn=_die_with_parent(self.death_signal),
                )
            self.starts += 1
            self.groups.add(self.popen.pid)
        if wait_ready and self.ready is not None:
            wait_for(self.ready, timeout_s=timeout_s, what=f"{self.name} ready", alive=self.alive,
                     interval_s=0.1)
        return time.monotonic() - began

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the process (SIGSTOP/SIGCONT: to every process of its group too)."""
        if not self.alive():
            return
        if sig in (signal.SIGSTOP, signal.SIGCONT):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, sig)

    def kill9(self) -> None:
        """SIGKILL the process alone (its children are left as a crash leaves them)."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGKILL)
            self.popen.wait(30)

    def stop(self, timeout_s: float = 60.0) -> float:
        """Stop with ``stop_signal`` (SIGKILL to the group after ``timeout_s``); the seconds
        until the process exited."""
        began = time.monotonic()
        if self.popen is None:
            return 0.0
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGCONT)  # a stopped process cannot exit
                os.kill(self.popen.pid, self.stop_signal)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(30)
        took = time.monotonic() - began
        # Whatever the process left in its group (prefork children, backends) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        return took

    def kill_groups(self) -> None:
        """SIGKILL whatever is left in every process group this Proc ever started."""
        for pgid in self.groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)

    def restart(self, *, timeout_s: float = START_TIMEOUT_S) -> float:
        self.stop()
        return self.start(timeout_s=timeout_s)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class Deployment:
    """Every process of the production layout on private instances (module docstring)."""

    PROC_NAMES = ("postgres", "redis", "daphne", "runticker-a", "runticker-b",
                  "celery-worker", "celery-beat")

    def __init__(self, *, clients: int = 50, quick: bool = False, keep_dir: bool = True) -> None:
        self.run_dir = Path(tempfile.mkdtemp(prefix="faults-"))
        os.chmod(self.run_dir, 0o755)
        self.logs_dir = self.run_dir / "logs"
        self.logs_dir.mkdir()
        self.n_clients = clients
        #: A --quick run: scenarios marked quick may shorten their durations.
        self.quick = quick
        self.keep_dir = keep_dir
        self.ports = PortPicker()
        self.procs: dict[str, Proc] = {}
        self.proxies: dict[str, Any] = {}
        self.env: dict[str, str] = {}
        self.direct_env: dict[str, str] = {}
        self.api_keys: list[str] = []
        self.accounts: list[int] = []
        self.tokens: dict[str, str] = {}
        self.fleet_tokens: list[str] = []
        self.canary = f"canary-{secrets.token_hex(12)}"
        self.ops_token = secrets.token_urlsafe(32)
        self.metrics_ports: dict[str, int] = {}
        self.chain: dict[str, Any] = {}
        self.clients = None
        self.probe = None
        self._sim_thread = None
        self._proxy_process = None
        self._down = False
        #: What a reset had to do beyond waiting (e.g. reconnecting the fleet): a finding.
        self.reset_notes: list[str] = []

    # --- lifecycle ------------------------------------------------------------------------

    @classmethod
    @contextlib.contextmanager
    def up(cls, **options: Any):
        dep = cls(**options)
        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # SIGTERM cleans up as Ctrl-C
        try:
            dep.start()
            yield dep
        finally:
            # A second Ctrl-C or SIGTERM must not cut the clean-up short.
            previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            try:
                dep.down()
            finally:
                signal.signal(signal.SIGINT, previous_int)
                signal.signal(signal.SIGTERM, previous)

    def start(self) -> None:
        print(f"faults: deployment in {self.run_dir} (logs: {self.logs_dir})", flush=True)
        p = self.ports
        self.pg_port, self.redis_port, self.sim_port = p.take(), p.take(), p.take()
        self.http_port = p.take()
        proxy_ports = {name: p.take() for name in ("postgres", "redis", "kite-rest", "kite-ws")}
        self.metrics_ports = {name: p.take() for name in ("runticker-a", "runticker-b",
                                                          "celery-worker")}
        self._build_env(proxy_ports)
        self._setup_django()
        self._start_postgres()
        self._start_redis()
        self._start_simulator()
        self._start_proxies(proxy_ports)
        self._prepare_database()
        self._start_product()
        self._start_clients_and_probe()

    def down(self) -> None:
        """Stop everything this deployment started (idempotent, never raises)."""
        if self._down:
            return
        self._down = True
        for step in (self._stop_probe_and_clients, self._stop_product_procs, self._stop_sim,
                     self._stop_proxies, self._stop_stores):
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - clean-up goes on whatever one step hit
                print(f"faults: clean-up step {step.__name__} failed: {exc!r}", file=sys.stderr)
        print(f"faults: deployment stopped; logs kept in {self.logs_dir}", flush=True)
        # The data directories go (tens of MB a run); the logs stay.
        for name in ("pgdata", "redis", "var", "celery-metrics"):
            shutil.rmtree(self.run_dir / name, ignore_errors=True)
        if not self.keep_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    # --- the stores ----------------------------------------------------------------------

    def _start_postgres(self) -> None:
        data = self.run_dir / "pgdata"
        sockets = self.run_dir / "pgsock"
        for d in (data, sockets):
            d.mkdir()
            shutil.chown(d, "postgres", "postgres")
        initdb = subprocess.run(
            ["runuser", "-u", "postgres", "--", str(PG_BIN / "initdb"), "-D", str(data),
             "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"],
            capture_output=True, text=True, timeout=120,
        )
        if initdb.returncode != 0:
            raise RuntimeError(f"initdb failed: {initdb.stderr[-2000:]}")
        self.procs["postgres"] = Proc(
            "postgres",
            [str(PG_BIN / "postgres"), "-D", str(data), "-p", str(self.pg_port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={sockets}",
             "-c", "fsync=off", "-c", "max_connections=300", "-c", "shared_buffers=64MB"],
            env={"PATH": os.environ.get("PATH", ""), "LANG": "C.UTF-8"}, cwd=self.run_dir,
            log_path=self.logs_dir / "postgres.log", user="postgres",
            stop_signal=signal.SIGINT,  # pg_ctl's "fast" shutdown
            death_signal=signal.SIGQUIT,  # "immediate": the runner is gone
            clear_old_groups_on_start=True,  # backends a kill -9 orphaned hold shared memory
            ready=lambda: self._pg_ready(),
        )
        self.procs["postgres"].start()

    def _pg_ready(self) -> bool:
        return subprocess.run(
            [str(PG_BIN / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.pg_port)],
            timeout=10,
        ).returncode == 0

    def _start_redis(self) -> None:
        redis_dir = self.run_dir / "redis"
        redis_dir.mkdir()
        self.procs["redis"] = Proc(
            "redis",
            ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(redis_dir), "--daemonize", "no"],
            env={"PATH": os.environ.get("PATH", "")}, cwd=redis_dir,
            log_path=self.logs_dir / "redis.log",
            ready=lambda: self._redis_ping(),
        )
        self.procs["redis"].start()

    def _redis_ping(self) -> bool:
        try:
            return self.redis_cli("ping").strip() == "PONG"
        except (subprocess.SubprocessError, OSError):
            return False

    def redis_cli(self, *args: str, timeout_s: float = 10.0) -> str:
        """redis-cli against the private Redis (direct, not proxied)."""
        result = subprocess.run(["redis-cli", "-p", str(self.redis_port), *map(str, args)],
                                capture_output=True, text=True, timeout=timeout_s)
        return result.stdout + result.stderr

    def psql(self, sql: str, *, database: str = DB_NAME, timeout_s: float = 30.0) -> str:
        """psql against the private cluster (direct); unaligned, tuples only."""
        result = subprocess.run(
            [str(PG_BIN / "psql"), "-h", "127.0.0.1", "-p", str(self.pg_port), "-U", "postgres",
             "-d", database, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql],
            capture_output=True, text=True, timeout=timeout_s,
        )
        if result.returncode != 0:
            raise RuntimeError(f"psql failed: {result.stderr.strip()[-1000:]}")
        return result.stdout

    def pg_ctl(self, action: str, mode: str = "fast", *, timeout_s: float = 60.0) -> float:
        """"stop" | "start" | "restart" the private cluster; the seconds it took.

        The postmaster is this runner's child, so pg_ctl's shutdown modes are sent as the
        signals pg_ctl sends (smart SIGTERM, fast SIGINT, immediate SIGQUIT).
        """
        proc = self.procs["postgres"]
        signals = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}
        if action not in ("stop", "start", "restart"):
            raise ValueError(f"pg_ctl action must be stop, start or restart, got {action!r}")
        if mode not in signals:
            raise ValueError(f"pg_ctl mode must be one of {sorted(signals)}, got {mode!r}")
        began = time.monotonic()
        if action in ("stop", "restart"):
            proc.stop_signal = signals[mode]
            try:
                proc.stop(timeout_s)
            finally:
                proc.stop_signal = signal.SIGINT
        if action in ("start", "restart"):
            proc.start(timeout_s=timeout_s)
        return time.monotonic() - began

    def _stop_stores(self) -> None:
        for name in ("redis", "postgres"):
            if name in self.procs:
                self.procs[name].stop(30)
                self.procs[name].kill_groups()

    # --- the simulator and the proxies ------------------------------------------------------

    def _start_simulator(self) -> None:
        from streaming.market import SyntheticMarket
        from streaming.sim.simulator import KiteSimulator, SimulatorThread

        sim = KiteSimulator(market=SyntheticMarket(seed=0), tick_interval_ms=250, port=self.sim_port)
        for i in (1, 2):
            key = f"fk{i}"
            sim.register_account(api_key=key, api_secret=f"{self.canary}-s{i}",
                                 access_token=f"tok-fk{i}-{secrets.token_hex(8)}")
            self.api_keys.append(key)
        self._sim_thread = SimulatorThread(sim, start_timeout_s=30)
        self._sim_thread.start()
        self.simulator = sim

    def sim(self, method: str, *args: Any, timeout_s: float = 30.0, **kwargs: Any) -> Any:
        """Call a KiteSimulator method on the simulator's loop (coroutines awaited there)."""
        fn = getattr(self.simulator, method)
        if inspect.iscoroutinefunction(fn):
            return self._sim_thread.run(fn(*args, **kwargs), timeout_s=timeout_s)
        return self._sim_thread.run(_call_on_loop(fn, args, kwargs), timeout_s=timeout_s)

    def sim_counts(self) -> dict[str, int]:
        """Live Kite connections per api_key, read on the simulator's loop in one call."""
        sim, keys = self.simulator, self.api_keys
        return self._sim_thread.run(
            _call_on_loop(lambda: {k: sim.connection_count(k) for k in keys}, (), {}), timeout_s=1.0
        )

    def _stop_sim(self) -> None:
        if self._sim_thread is not None:
            self._sim_thread.stop()

    def _start_proxies(self, ports: dict[str, int]) -> None:
        from faults.proxy import ProxyProcess, ProxySpec

        targets = {"postgres": self.pg_port, "redis": self.redis_port,
                   "kite-rest": self.sim_port, "kite-ws": self.sim_port}
        self._proxy_process = ProxyProcess(
            [ProxySpec(name=name, listen_port=port, target_port=targets[name])
             for name, port in ports.items()]
        )
        self.proxies = self._proxy_process.proxies

    def _stop_proxies(self) -> None:
        if self._proxy_process is not None:
            self._proxy_process.stop()

    # --- environment and database ------------------------------------------------------------

    def _build_env(self, proxy_ports: dict[str, int]) -> None:
        from cryptography.fernet import Fernet

        inherited = {k: v for k, v in os.environ.items()
                     if k in ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "VIRTUAL_ENV", "UV_PYTHON_DOWNLOADS")}
        var_dir = self.run_dir / "var"
        var_dir.mkdir()
        from streaming.sim.simulator import WS_PATH

        self.env = {
            **inherited,
            "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1",
            "DJANGO_SETTINGS_MODULE": "tickerproj.settings",
            "TICKERPROJ_VAR_DIR": str(var_dir),
            "DATABASE_URL": f"postgres://postgres@127.0.0.1:{proxy_ports['postgres']}/{DB_NAME}",
            "REDIS_URL": f"redis://127.0.0.1:{proxy_ports['redis']}/0",
            "CHANNEL_LAYER_PREFIX": "faults",
            "KITE_API_ROOT": f"http://127.0.0.1:{proxy_ports['kite-rest']}",
            "KITE_WS_URL": f"ws://127.0.0.1:{proxy_ports['kite-ws']}{WS_PATH}",
            "KITE_LOGIN_URL": f"http://127.0.0.1:{proxy_ports['kite-rest']}/connect/login",
            "SECRET_KEY": secrets.token_urlsafe(50),
            "FIELD_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
            "OPS_TOKEN": self.ops_token,
            "LOG_JSON": "true",
            "MARKET_HOURS_ALWAYS_OPEN": "true",
            "TICKER_RECORDING_DIR": str(var_dir / "recordings"),
            "ALLOWED_HOSTS": "127.0.0.1,localhost",
            "CSRF_TRUSTED_ORIGINS": f"http://127.0.0.1:{self.http_port}",
            "WS_ALLOWED_ORIGINS": f"http://127.0.0.1:{self.http_port}",
            "CELERY_METRICS_PORT": str(self.metrics_ports["celery-worker"]),
            "PROMETHEUS_MULTIPROC_DIR": str(self.run_dir / "celery-metrics"),
        }
        # The runner and its helpers (migrations, psql-like reads) go direct, not proxied.
        self.direct_env = {
            **self.env,
            "DATABASE_URL": f"postgres://postgres@127.0.0.1:{self.pg_port}/{DB_NAME}",
            "REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "KITE_API_ROOT": f"http://127.0.0.1:{self.sim_port}",
            "KITE_WS_URL": f"ws://127.0.0.1:{self.sim_port}{WS_PATH}",
        }
        del self.direct_env["PROMETHEUS_MULTIPROC_DIR"]
        (self.run_dir / "work").mkdir()

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.http_port}/ws/v1/"

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def manage(self, *args: str, timeout_s: float = 300.0, direct: bool = False,
               check: bool = False) -> subprocess.CompletedProcess:
        """``manage.py`` with dep.env (``direct``: bypassing the proxies)."""
        return subprocess.run(
            [sys.executable, str(REPO / "manage.py"), *args],
            env=self.direct_env if direct else self.env, cwd=self.run_dir / "work",
            capture_output=True, text=True, timeout=timeout_s, check=check,
        )

    def _prepare_database(self) -> None:
        self.psql(f"CREATE DATABASE {DB_NAME}", database="postgres")
        for args in (("migrate", "--noinput"), ("ensure_schedules",)):
            result = self.manage(*args, direct=True)
            if result.returncode != 0:
                raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{result.stderr[-3000:]}")
        self._create_accounts_and_users()
        result = self.manage("refresh_instruments", direct=True)
        if result.returncode != 0:
            raise RuntimeError(f"refresh_instruments failed:\n{result.stderr[-3000:]}")
        self._subscribe_chain()

    def _setup_django(self) -> None:
        """The runner's own Django, on the private instances (direct)."""
        import logging

        import django
        from django.conf import settings

        if settings.configured:
            raise RuntimeError("Django settings were read before the deployment's environment "
                               "was set (a scenario module touches Django when imported)")
        os.environ.update(self.direct_env)
        os.environ.pop("TEST_DATABASE_NAME", None)

        django.setup()
        # The runner's own Django and simulator logs go to a file; stdout is the figures.
        runner_log = (self.logs_dir / "runner.log").open("a")
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setStream(runner_log)

    def _create_accounts_and_users(self) -> None:
        from django.contrib.auth import get_user_model

        from accounts.models import ApiToken, KiteAccount
        from accounts.services import account_set_session, apitoken_create

        for i, key in enumerate(self.api_keys, start=1):
            account = KiteAccount.objects.create(
                label=f"acc{i}", api_key=key, api_secret=f"{self.canary}-s{i}"
            )
            account_set_session(account=account, access_token=self.simulator.access_token(key))
            self.accounts.append(account.pk)
        users = get_user_model().objects
        user = users.create_user(username="faults-user", password=secrets.token_urlsafe(16))
        for scope in ApiToken.Scope.values:
            _token, self.tokens[scope] = apitoken_create(user=user, name=f"faults-{scope}",
                                                         scopes=[scope])
        # The fleet: 10 clients per user (WS_MAX_CONNECTIONS_PER_USER is 20).
        for u in range((self.n_clients + 9) // 10):
            fleet_user = users.create_user(username=f"fleet-{u}", password=secrets.token_urlsafe(16))
            _token, key = apitoken_create(user=fleet_user, name="fleet")
            self.fleet_tokens.append(key)

    def _subscribe_chain(self) -> None:
        from subscriptions.models import Instrument, Subscription
        from subscriptions.services import subscription_activate, subscriptions_activate_chain

        options = Instrument.objects.filter(name="NIFTY", instrument_type=Instrument.Type.CALL)
        expiry = min(options.values_list("expiry", flat=True))
        strikes = sorted(set(options.filter(expiry=expiry).values_list("strike", flat=True)))
        subscriptions_activate_chain(underlying="NIFTY", expiries=[expiry],
                                     around_price=strikes[len(strikes) // 2], strikes_each_side=10)
        for instrument in Instrument.objects.filter(name="NIFTY").exclude(
            instrument_type__in=[Instrument.Type.CALL, Instrument.Type.PUT]
        ):
            subscription_activate(instrument=instrument, mode=Subscription.Mode.FULL)
        tokens = list(Subscription.objects.filter(status=Subscription.Status.ACTIVE).values_list("instrument_id", flat=True))
        self.chain = {"underlying": "NIFTY", "expiry": expiry.isoformat(), "tokens": tokens}

    # --- the product ----------------------------------------------------------------------

    def _start_product(self) -> None:
        work = self.run_dir / "work"
        py = sys.executable
        manage = str(REPO / "manage.py")

        def proc(name: str, argv: list[str], **kw: Any) -> Proc:
            self.procs[name] = Proc(name, argv, env=self.env, cwd=work,
                                    log_path=self.logs_dir / f"{name}.log", **kw)
            return self.procs[name]

        proc("daphne", [py, "-m", "daphne", "-b", "127.0.0.1", "-p", str(self.http_port),
                        "--proxy-headers", "tickerproj.asgi:application"],
             ready=lambda: self.health()[0] in (200, 503))
        for name, engine_id in (("runticker-a", "engine-a"), ("runticker-b", "engine-b")):
            port = self.metrics_ports[name]
            proc(name, [py, manage, "runticker", "--no-mock", "--engine-id", engine_id,
                        "--metrics-port", str(port)],
                 ready=lambda port=port: _http_status(f"http://127.0.0.1:{port}/metrics") == 200)
        metrics_dir = Path(self.env["PROMETHEUS_MULTIPROC_DIR"])

        def clear_metrics_dir() -> None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
            metrics_dir.mkdir()

        proc("celery-worker", [py, "-m", "celery", "-A", "tickerproj", "--quiet", "worker",
                               "--concurrency", "2", "--hostname", "worker@faults"],
             before_start=clear_metrics_dir,
             ready=lambda: self._celery_metrics_status() in (200, 403))
        proc("celery-beat", [py, "-m", "celery", "-A", "tickerproj", "--quiet", "beat",
                             "--schedule", str(self.run_dir / "work" / "beat-schedule")])
        for name in ("daphne", "runticker-a", "runticker-b", "celery-worker", "celery-beat"):
            self.procs[name].start(wait_ready=False)
        for name in ("daphne", "runticker-a", "runticker-b", "celery-worker"):
            self.procs[name].start()  # now waits until each serves
        wait_for(lambda: self.sim_connections_total() >= len(self.api_keys), timeout_s=START_TIMEOUT_S,
                 what="every account streaming from the simulator")

    def _celery_metrics_status(self) -> int:
        return _http_status(f"http://127.0.0.1:{self.metrics_ports['celery-worker']}/metrics",
                            bearer=self.ops_token)

    def _stop_product_procs(self) -> None:
        for name in ("celery-beat", "daphne", "runticker-a", "runticker-b", "celery-worker"):
            if name in self.procs:
                self.procs[name].stop(40)
                self.procs[name].kill_groups()

    def sim_connections_total(self) -> int:
        return sum(self.sim("connection_count", key) for key in self.api_keys)

    # --- clients and probe ------------------------------------------------------------------

    def _start_clients_and_probe(self) -> None:
        from faults.clients import ClientFleet
        from faults.probe import Probe

        self.clients = ClientFleet(
            ws_url=self.ws_url, origin=self.origin, tokens=self.fleet_tokens,
            chain={"underlying": self.chain["underlying"], "expiry": self.chain["expiry"]},
            count=self.n_clients, log_path=self.logs_dir / "clients.log",
        )
        self.probe = Probe(self)
        self.probe.start()
        self.wait_healthy(START_TIMEOUT_S)

    def _stop_probe_and_clients(self) -> None:
        if self.probe is not None:
            self.probe.stop()
        if self.clients is not None:
            self.clients.stop()

    # --- health ---------------------------------------------------------------------------

    def health(self, *, timeout_s: float = 5.0) -> tuple[int, dict]:
        """(status, body) of /health with the ops token (0, {} when daphne does not answer)."""
        import orjson

        request = urllib.request.Request(
            f"{self.http_url}/health", headers={"Authorization": f"Bearer {self.ops_token}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return response.status, orjson.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                return exc.code, orjson.loads(exc.read())
            except ValueError:
                return exc.code, {}
        except (OSError, ValueError):
            return 0, {}

    def wait_healthy(self, timeout_s: float = 120.0) -> float:
        """Seconds until /health is 200, both runtickers run, every account streams and every
        fleet client is connected with a fresh frame; TimeoutError past ``timeout_s``."""
        began = time.monotonic()
        deadline = began + timeout_s

        def left() -> float:
            return max(0.1, deadline - time.monotonic())

        wait_for(lambda: self.procs["runticker-a"].alive() and self.procs["runticker-b"].alive(),
                 timeout_s=left(), what="both runtickers running")
        wait_for(lambda: self.health()[0] == 200, timeout_s=left(), what="/health 200",
                 interval_s=0.2)
        wait_for(lambda: all(self.sim("connection_count", k) >= 1 for k in self.api_keys),
                 timeout_s=left(), what="every account streaming", interval_s=0.2)
        if self.clients is not None:
            since = time.monotonic()
            if self.clients.wait_all_fresh(since, timeout_s=left()) is None:
                raise FleetNotFresh(f"fleet clients not all fresh within {timeout_s} s: "
                                   f"{self.clients.summary()}")
        return time.monotonic() - began

    def reset_between_scenarios(self, *, timeout_s: float = 180.0) -> float:
        """Every proxy "pass", every process up, the simulator's faults cleared, accounts'
        tokens valid at the simulator; then wait_healthy. Returns the seconds it took."""
        began = time.monotonic()
        for proxy in self.proxies.values():
            proxy.set_mode("pass")
        self.sim("clear_faults")
        for proc in self.procs.values():
            if proc.alive():
                proc.signal(signal.SIGCONT)
        for name in ("postgres", "redis"):
            if not self.procs[name].alive():
                self.procs[name].start()
        for name in ("daphne", "runticker-a", "runticker-b", "celery-worker", "celery-beat"):
            if not self.procs[name].alive():
                self.procs[name].start()
        self._restore_sessions()
        if self.clients is not None:
            self.clients.ensure_running()

        def left() -> float:
            return max(10.0, timeout_s - (time.monotonic() - began))

        # A deployment that does not come back by itself would spoil every later scenario:
        # the reset escalates, and each step it had to take is noted (a finding to read).
        try:
            self.wait_healthy(min(RECOVERY_WAIT_S, left()))
            return time.monotonic() - began
        except FleetNotFresh as exc:
            # Connected clients that get nothing (e.g. their groups lost with Redis's memory).
            self._note(f"fleet reconnected after {RECOVERY_WAIT_S:.0f} s: {exc}")
            self.clients.reconnect_all()
        except TimeoutError as exc:
            self._note(f"runtickers and daphne restarted after {RECOVERY_WAIT_S:.0f} s: {exc}")
            self._restart_product()
        try:
            self.wait_healthy(min(RECOVERY_WAIT_S, left()))
        except TimeoutError as exc:
            self._note(f"every product process restarted: {exc}")
            self._restart_product(everything=True)
            self.wait_healthy(left())
        return time.monotonic() - began

    def _note(self, text: str) -> None:
        self.reset_notes.append(text)
        print(f"faults: reset: {text}", flush=True)

    def _restart_product(self, *, everything: bool = False) -> None:
        names = ["daphne", "runticker-a", "runticker-b"]
        if everything:
            names += ["celery-worker", "celery-beat"]
        for name in names:
            self.procs[name].stop(40)
        for name in names:
            self.procs[name].start(wait_ready=False)
        for name in names:
            self.procs[name].start()
        if self.clients is not None:
            self.clients.reconnect_all()

    def _restore_sessions(self) -> None:
        """An account whose token a scenario expired gets a fresh session again."""
        from django.db import close_old_connections

        from accounts.models import KiteAccount
        from accounts.services import account_set_session

        close_old_connections()
        for pk in self.accounts:
            account = KiteAccount.objects.get(pk=pk)
            sim_token = self.sim("access_token", account.api_key)
            if (sim_token is None or account.status != KiteAccount.Status.ACTIVE
                    or account.access_token != sim_token):
                if sim_token is None:
                    sim_token = f"tok-{account.api_key}-{secrets.token_hex(8)}"
                    self.sim("set_access_token", account.api_key, sim_token)
                account_set_session(account=account, access_token=sim_token)


async def _call_on_loop(fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    return fn(*args, **kwargs)


def _http_status(url: str, *, bearer: str | None = None, timeout_s: float = 3.0) -> int:
    headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                    timeout=timeout_s) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
