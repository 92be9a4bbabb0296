"""Two runticker processes: each account is streamed by exactly one; when the holder is killed
(-9) the other takes its accounts over within 30 s, and no api_key ever has more than 3
connections at the simulator, sampled continuously through the whole test."""

import threading
import time

import pytest
from django.db.models.functions import Now

from streaming.kite.limits import MAX_CONNECTIONS_PER_API_KEY
from streaming.market import SyntheticMarket
from streaming.models import AccountLease, EngineHeartbeat
from streaming.sim.simulator import KiteSimulator, SimulatorThread
from tests.helpers import wait_until
from tests.streaming.engine.runtime_helpers import (
    ManagePy,
    instruments_from_market,
    make_account,
    subprocess_env,
    subscribe,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.heavy]

KEYS = ("k1", "k2")
PER_ACCOUNT = 6500  # three connections each: 3000 + 3000 + 500
LEASE_TTL_S = 15.0
TAKEOVER_LIMIT_S = 30.0


def make_market() -> SyntheticMarket:
    # 70 synthetic indices of ~190 contracts each: enough for 2 x 6500 instruments.
    return SyntheticMarket(seed=0, extra_underlyings=70)


@pytest.fixture
def world():
    market = make_market()
    instruments_from_market(market)
    tokens = sorted(r["instrument_token"] for r in market.instruments)
    assert len(tokens) >= PER_ACCOUNT * len(KEYS)
    subscribe(tokens[: PER_ACCOUNT * len(KEYS)])
    return [make_account(f"acc{i}", api_key=key, access_token=f"tok-{key}")
            for i, key in enumerate(KEYS, start=1)]


class ConnectionSampler(threading.Thread):
    """Samples the simulator's live connections per api_key every few milliseconds."""

    def __init__(self, simulator: SimulatorThread, sim: KiteSimulator) -> None:
        super().__init__(name="connection-sampler", daemon=True)
        self._simulator = simulator
        self._sim = sim
        self.max_seen = dict.fromkeys(KEYS, 0)
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            counts = self._simulator.call(lambda: {k: self._sim.connection_count(k) for k in KEYS})
            for key, n in counts.items():
                self.max_seen[key] = max(self.max_seen[key], n)
            self.samples += 1
            self._stop_event.wait(0.005)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


def owners() -> set[str]:
    """The --engine-id prefixes owning unexpired leases, by the database clock the leases use.

    runticker appends a random suffix to the given id; it is checked here and dropped.
    """
    full = set(AccountLease.objects.filter(expires_at__gt=Now()).values_list("owner", flat=True))
    assert all(o.count(":") == 1 for o in full), full
    return {o.rsplit(":", 1)[0] for o in full}


def heartbeats_of(prefix: str):
    return EngineHeartbeat.objects.filter(engine_id__startswith=f"{prefix}:")


def fully_streamed(simulator, sim) -> bool:
    return simulator.call(
        lambda: all(
            sim.connection_count(k) == MAX_CONNECTIONS_PER_API_KEY
            and len(sim.subscriptions(k)) == PER_ACCOUNT
            for k in KEYS
        )
    )


def test_a_second_runticker_takes_over_a_killed_ones_accounts(world, tmp_path):
    sim = KiteSimulator(market=make_market(), tick_interval_ms=1000)
    for key in KEYS:
        sim.register_account(api_key=key, api_secret="secret", access_token=f"tok-{key}")
    with SimulatorThread(sim) as simulator:
        sampler = ConnectionSampler(simulator, sim)
        sampler.start()
        env = subprocess_env(
            KITE_WS_URL=simulator.ws_url,
            KITE_API_ROOT=simulator.http_url,
            TICKER_LEASE_TTL_S=str(LEASE_TTL_S),
            TICKER_HEARTBEAT_INTERVAL_S="1",
        )
        first = ManagePy(["runticker", "--no-mock", "--engine-id", "engine-A"], env=env,
                         log_path=tmp_path / "a.log")
        second = None
        try:
            wait_until(lambda: owners() == {"engine-A"} and fully_streamed(simulator, sim),
                       timeout_s=120, what="engine A streaming both accounts")
            second = ManagePy(["runticker", "--no-mock", "--engine-id", "engine-B"], env=env,
                              log_path=tmp_path / "b.log")
            wait_until(lambda: heartbeats_of("engine-B").exists(),
                       timeout_s=120, what="engine B running")
            # B is up and trying; A keeps both accounts while it lives.
            time.sleep(2 * LEASE_TTL_S / 3)
            assert owners() == {"engine-A"}

            first.kill()
            killed_at = time.monotonic()
            wait_until(lambda: owners() == {"engine-B"} and fully_streamed(simulator, sim),
                       timeout_s=TAKEOVER_LIMIT_S + 10, what="engine B took over")
            took_s = time.monotonic() - killed_at
            assert took_s < TAKEOVER_LIMIT_S, f"takeover took {took_s:.1f} s"
            wait_until(
                lambda: set(heartbeats_of("engine-B").get().state["accounts"])
                == {"acc1", "acc2"},
                timeout_s=5, what="B's heartbeat lists both accounts",
            )

            # SIGTERM: B closes its sockets, then hands the leases back at once.
            assert second.terminate() == 0, second.output()[-3000:]
            assert not AccountLease.objects.exists()
            assert simulator.call(lambda: sum(sim.connection_count(k) for k in KEYS)) == 0
        finally:
            sampler.stop()
            first.stop()
            if second is not None:
                second.stop()
        assert sampler.samples > 100
        assert sampler.max_seen == dict.fromkeys(KEYS, MAX_CONNECTIONS_PER_API_KEY)
