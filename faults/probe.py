"""The probe: every 5 ms, in its own thread of the runner, one sample of the deployment.

A sample holds /health's status and latency, RSS and CPU of every product process (from
/proc; CPU over the last 100 ms, as the kernel counts in 10 ms ticks), Redis's used memory
(direct) and the Kite connections per api_key as the simulator counts them. /health is called
by a thread of its own, one request after the other every 5 ms at most (one keep-alive
connection, with the ops token), so a slow /health never slows the sampling: a sample carries
the status of the last answer and, as latency, the last answer's or, if longer, the age of
the request still waiting (a frozen daphne shows as a latency growing by 5 ms a sample,
status 0 once a request fails or waits past 5 s). Samples are kept in
one flat array of floats (about 150 bytes a sample, an hour is 100 MB at most), so long runs
stay small. Every 500 ms the Prometheus metrics of both runtickers and daphne are scraped.
"""

from __future__ import annotations

import bisect
import contextlib
import http.client
import os
import threading
import time
from array import array
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from faults.deployment import Deployment

INTERVAL_S = 0.005
METRICS_INTERVAL_S = 0.5
CPU_WINDOW_S = 0.1
#: The oldest samples are dropped past this many (about 2 h at 5 ms).
MAX_SAMPLES = 1_500_000
_PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20
_CLK_TCK = os.sysconf("SC_CLK_TCK")
NAN = float("nan")


@dataclass(frozen=True)
class Sample:
    t: float  #: time.monotonic() when the sample began
    health_status: int  #: 0 when /health did not answer
    health_ms: float
    rss_mb: dict[str, float]
    cpu_pct: dict[str, float]
    redis_used_mb: float | None
    kite_conns: dict[str, int]


@dataclass
class MetricsScrape:
    t: float
    source: str  #: "runticker-a", "runticker-b" or "daphne"
    ok: bool
    values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = field(default_factory=dict)

    def get(self, name: str, **labels: str) -> float | None:
        """The sample ``name`` whose labels include ``labels`` (summed over the rest)."""
        wanted = set(labels.items())
        found = [v for (n, ls), v in self.values.items() if n == name and wanted <= set(ls)]
        return sum(found) if found else None


class Probe:
    def __init__(self, dep: Deployment) -> None:
        self.dep = dep
        self.proc_names = list(dep.procs)
        self.api_keys = list(dep.api_keys)
        # One row: t, status, ms, rss x P, cpu x P, redis, conns x K.
        self.width = 4 + 2 * len(self.proc_names) + len(self.api_keys)
        self._data = array("d")
        self._times: list[float] = []
        self._lock = threading.Lock()
        self._marks: list[tuple[float, str]] = []
        self._scrapes: deque[MetricsScrape] = deque(maxlen=20000)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._cpu_history: dict[str, deque[tuple[float, int, int]]] = {
            n: deque() for n in self.proc_names
        }
        self._health_conn: http.client.HTTPConnection | None = None
        self._health_last: tuple[int, float] = (0, NAN)
        self._health_in_flight_since: float | None = None
        self._redis = None

    # --- running ------------------------------------------------------------------------

    def start(self) -> None:
        for target, name in ((self._health_loop, "probe-health"), (self._sample_loop, "probe"),
                             (self._metrics_loop, "probe-metrics")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)

    def mark(self, label: str) -> float:
        """Note a moment (e.g. "redis stopped"); returns its monotonic time."""
        t = time.monotonic()
        with self._lock:
            self._marks.append((t, label))
        return t

    def marks(self) -> list[tuple[float, str]]:
        with self._lock:
            return list(self._marks)

    def _sample_loop(self) -> None:
        import redis

        self._redis = redis.Redis(host="127.0.0.1", port=self.dep.redis_port,
                                  socket_timeout=0.05, socket_connect_timeout=0.05)
        next_at = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now < next_at:
                time.sleep(next_at - now)
            t = time.monotonic()
            next_at = t + INTERVAL_S
            try:
                row = self._sample(t)
            except Exception:  # noqa: BLE001 - a sample that fails is skipped, the probe goes on
                continue
            with self._lock:
                self._data.extend(row)
                self._times.append(t)
                if len(self._times) > MAX_SAMPLES:
                    drop = len(self._times) // 10
                    del self._times[:drop]
                    del self._data[: drop * self.width]

    def _health_loop(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now < next_at:
                time.sleep(next_at - now)
            began = time.monotonic()
            next_at = began + INTERVAL_S
            self._health_in_flight_since = began
            status, ms = self._health()
            self._health_last = (status, ms)
            self._health_in_flight_since = None

    def _health_now(self, t: float) -> tuple[int, float]:
        status, ms = self._health_last
        waiting_since = self._health_in_flight_since
        if waiting_since is not None:
            ms = max(ms, (t - waiting_since) * 1000.0)
        return status, ms

    def _sample(self, t: float) -> list[float]:
        status, ms = self._health_now(t)
        rss, cpu = [], []
        for name in self.proc_names:
            r, c = self._proc_stats(name, t)
            rss.append(r)
            cpu.append(c)
        redis_mb = self._redis_used_mb()
        conns = self._kite_conns()
        return [t, float(status), ms, *rss, *cpu, redis_mb, *conns]

    def _health(self) -> tuple[int, float]:
        began = time.perf_counter()
        try:
            if self._health_conn is None:
                self._health_conn = http.client.HTTPConnection("127.0.0.1", self.dep.http_port,
                                                               timeout=5)
            self._health_conn.request("GET", "/health",
                                      headers={"Authorization": f"Bearer {self.dep.ops_token}"})
            response = self._health_conn.getresponse()
            response.read()
            status = response.status
            if response.will_close:
                self._health_conn.close()
                self._health_conn = None
        except (OSError, http.client.HTTPException):
            status = 0
            if self._health_conn is not None:
                self._health_conn.close()
            self._health_conn = None
        return status, (time.perf_counter() - began) * 1000.0

    def _proc_stats(self, name: str, t: float) -> tuple[float, float]:
        pid = self.dep.procs[name].pid
        if pid is None or not self.dep.procs[name].alive():
            self._cpu_history[name].clear()
            return NAN, NAN
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                rss_pages = int(f.read().split()[1])
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            ticks = int(fields[11]) + int(fields[12])  # utime + stime
        except (OSError, IndexError, ValueError):
            return NAN, NAN
        history = self._cpu_history[name]
        if history and history[-1][1] != pid:
            history.clear()  # restarted: a new process's counters
        history.append((t, pid, ticks))
        while len(history) > 2 and t - history[1][0] >= CPU_WINDOW_S:
            history.popleft()
        t0, _, ticks0 = history[0]
        cpu = (ticks - ticks0) / _CLK_TCK / (t - t0) * 100.0 if t > t0 else NAN
        return rss_pages * _PAGE_MB, cpu

    def _redis_used_mb(self) -> float:
        try:
            return int(self._redis.info("memory")["used_memory"]) / 2**20
        except Exception:  # noqa: BLE001 - Redis down is a value (NaN), not a probe failure
            return NAN

    def _kite_conns(self) -> list[float]:
        try:
            counts = self.dep.sim_counts()
        except Exception:  # noqa: BLE001
            return [NAN] * len(self.api_keys)
        return [float(counts.get(k, 0)) for k in self.api_keys]

    def _metrics_loop(self) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        sources = {
            "runticker-a": f"http://127.0.0.1:{self.dep.metrics_ports['runticker-a']}/metrics",
            "runticker-b": f"http://127.0.0.1:{self.dep.metrics_ports['runticker-b']}/metrics",
            "daphne": f"{self.dep.http_url}/metrics",
        }
        import urllib.request

        while not self._stop.wait(METRICS_INTERVAL_S):
            for source, url in sources.items():
                t = time.monotonic()
                scrape = MetricsScrape(t=t, source=source, ok=False)
                request = urllib.request.Request(
                    url, headers={"Authorization": f"Bearer {self.dep.ops_token}"}
                )
                with contextlib.suppress(Exception):
                    with urllib.request.urlopen(request, timeout=2) as response:
                        text = response.read().decode()
                    for family in text_string_to_metric_families(text):
                        for s in family.samples:
                            scrape.values[(s.name, tuple(sorted(s.labels.items())))] = s.value
                    scrape.ok = True
                with self._lock:
                    self._scrapes.append(scrape)

    # --- reading --------------------------------------------------------------------------

    def samples(self, since: float | None = None, until: float | None = None) -> list[Sample]:
        """The samples taken in [since, until] (monotonic; None: unbounded)."""
        with self._lock:
            lo = 0 if since is None else bisect.bisect_left(self._times, since)
            hi = len(self._times) if until is None else bisect.bisect_right(self._times, until)
            rows = self._data[lo * self.width: hi * self.width]
        return [self._sample_of(rows, i) for i in range(hi - lo)]

    def _sample_of(self, rows: array, i: int) -> Sample:
        w, p = self.width, len(self.proc_names)
        r = rows[i * w:(i + 1) * w]
        redis_mb = r[3 + 2 * p]
        return Sample(
            t=r[0], health_status=int(r[1]), health_ms=r[2],
            rss_mb=dict(zip(self.proc_names, r[3:3 + p], strict=True)),
            cpu_pct=dict(zip(self.proc_names, r[3 + p:3 + 2 * p], strict=True)),
            redis_used_mb=None if redis_mb != redis_mb else redis_mb,
            kite_conns={k: (-1 if v != v else int(v))
                        for k, v in zip(self.api_keys, r[4 + 2 * p:], strict=True)},
        )

    def scrapes(self, source: str | None = None, since: float | None = None,
                until: float | None = None) -> list[MetricsScrape]:
        """Metrics scrapes (every 500 ms) of ``source`` in [since, until]."""
        with self._lock:
            items = list(self._scrapes)
        return [s for s in items if (source is None or s.source == source)
                and (since is None or s.t >= since) and (until is None or s.t <= until)]

    def latest_metrics(self, source: str) -> MetricsScrape | None:
        found = [s for s in self.scrapes(source) if s.ok]
        return found[-1] if found else None

    def max_kite_conns(self, since: float, until: float | None = None) -> dict[str, int]:
        """The most Kite connections per api_key in any sample of [since, until]."""
        with self._lock:
            lo = bisect.bisect_left(self._times, since)
            hi = len(self._times) if until is None else bisect.bisect_right(self._times, until)
            rows = self._data[lo * self.width: hi * self.width]
        w, p = self.width, len(self.proc_names)
        result = {}
        for j, key in enumerate(self.api_keys):
            col = [rows[i * w + 4 + 2 * p + j] for i in range(hi - lo)]
            col = [v for v in col if v == v]
            result[key] = int(max(col)) if col else 0
        return result

    def rate_hz(self, since: float, until: float) -> float:
        """Samples per second achieved over [since, until] (the target is 200)."""
        with self._lock:
            n = bisect.bisect_right(self._times, until) - bisect.bisect_left(self._times, since)
        return n / (until - since) if until > since else 0.0


def summarize(values: list[float]) -> dict[str, Any]:
    """max, p50, p99 of a list (None entries ignored)."""
    vals = sorted(v for v in values if v is not None and v == v)
    if not vals:
        return {"max": None, "p50": None, "p99": None}
    return {"max": vals[-1], "p50": vals[len(vals) // 2],
            "p99": vals[min(len(vals) - 1, int(0.99 * len(vals)))]}
