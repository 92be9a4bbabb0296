"""Kite's per-api-key rate limits: paced per endpoint class, shared across processes by Redis."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis
from django.conf import settings

from streaming.kite.limits import (
    HISTORICAL_REQUESTS_PER_S,
    OTHER_REQUESTS_PER_S,
    QUOTE_REQUESTS_PER_S,
)
from streaming.kite.rest import (
    RATE_MARGIN,
    KiteNetworkError,
    KiteRateLimiter,
    KiteRateLimiterUnavailable,
    KiteRateLimitTimeout,
    KiteRestClient,
)
from streaming.market import IST, SyntheticMarket
from streaming.sim.simulator import KiteSimulator, SimulatorThread

REPO = Path(__file__).resolve().parents[3]
API_KEY = "ratekey"
ACCESS_TOKEN = "r" * 32


class NoSleep:
    """Records the waits asked for instead of sleeping, so pacing arithmetic is exact."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def interval_ms(per_s: int) -> float:
    return 1000.0 * (1 + RATE_MARGIN) / per_s


@pytest.mark.parametrize(
    ("rate_class", "per_s"),
    [("quote", QUOTE_REQUESTS_PER_S), ("historical", HISTORICAL_REQUESTS_PER_S), ("other", OTHER_REQUESTS_PER_S)],
)
@pytest.mark.parametrize("shared", [False, True], ids=["in_process", "redis"])
def test_each_endpoint_class_is_paced_at_kites_limit(rate_class, per_s, shared, redis_client):
    sleep = NoSleep()
    limiter = KiteRateLimiter(redis_client=redis_client if shared else None, sleep=sleep)
    slots = [limiter.acquire(api_key=API_KEY, rate_class=rate_class) for _ in range(5)]
    gaps = [b.send_at_ms - a.send_at_ms for a, b in itertools.pairwise(slots)]
    # Redis keeps whole milliseconds and rounds the interval up.
    expected = interval_ms(per_s) if not shared else -(-interval_ms(per_s) // 1)
    assert gaps == pytest.approx([expected] * 4, abs=0.001)
    # Every booking after the first waited for its slot (no time passes: sleep is recorded).
    assert slots[0].waited_s < 0.05
    assert sleep.waits == pytest.approx([s.waited_s for s in slots[1:]])
    assert sleep.waits[-1] == pytest.approx(4 * interval_ms(per_s) / 1000, abs=0.06)


def test_classes_and_api_keys_have_separate_budgets(redis_client):
    sleep = NoSleep()
    limiter = KiteRateLimiter(redis_client=redis_client, sleep=sleep)
    limiter.acquire(api_key=API_KEY, rate_class="quote")
    limiter.acquire(api_key=API_KEY, rate_class="historical")
    limiter.acquire(api_key=API_KEY, rate_class="other")
    limiter.acquire(api_key="another", rate_class="quote")
    assert sleep.waits == []
    limiter.acquire(api_key=API_KEY, rate_class="quote")
    assert sleep.waits == [pytest.approx(interval_ms(QUOTE_REQUESTS_PER_S) / 1000, abs=0.05)]


def test_a_wait_beyond_the_maximum_fails_without_booking(redis_client):
    sleep = NoSleep()
    limiter = KiteRateLimiter(redis_client=redis_client, sleep=sleep, max_wait_s=0.5)
    first = limiter.acquire(api_key=API_KEY, rate_class="quote")
    with pytest.raises(KiteRateLimitTimeout, match=r"no quote rate-limit slot for ratekey within 0\.5s"):
        limiter.acquire(api_key=API_KEY, rate_class="quote")
    # The refused call booked nothing: the next free slot is still one interval after the first.
    patient = KiteRateLimiter(redis_client=redis_client, sleep=sleep)
    second = patient.acquire(api_key=API_KEY, rate_class="quote")
    assert second.send_at_ms - first.send_at_ms == pytest.approx(interval_ms(1), abs=1)


def test_an_unreachable_redis_refuses_requests_instead_of_sending_them_unthrottled():
    limiter = KiteRateLimiter.from_redis_url("redis://127.0.0.1:1/0")
    with pytest.raises(KiteRateLimiterUnavailable, match="ConnectionError") as info:
        limiter.acquire(api_key=API_KEY, rate_class="quote", endpoint="quote")
    assert info.value.endpoint == "quote"


WORKER = """
import json, sys, time
from streaming.kite.rest import KiteRateLimiter
redis_url, start_at, count = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
limiter = KiteRateLimiter.from_redis_url(redis_url)
time.sleep(max(0.0, start_at - time.time()))
slots = [limiter.acquire(api_key="ratekey", rate_class="other").send_at_ms for _ in range(count)]
print(json.dumps(slots))
"""


def test_two_processes_share_one_budget(redis_client):
    count = 8
    start_at = time.time() + 1.5  # both processes begin booking at the same moment
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, settings.REDIS_URL, str(start_at), str(count)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for _ in range(2)
    ]
    results = []
    for worker in workers:
        out, err = worker.communicate(timeout=60)
        assert worker.returncode == 0, err
        results.append(json.loads(out))
    slots = sorted(results[0] + results[1])
    assert len(slots) == 2 * count and len(set(slots)) == 2 * count
    gaps = [b - a for a, b in itertools.pairwise(slots)]
    # Together, never faster than one request per interval: at most 10 in any second.
    assert min(gaps) >= interval_ms(OTHER_REQUESTS_PER_S)
    for i in range(len(slots) - OTHER_REQUESTS_PER_S):
        assert slots[i + OTHER_REQUESTS_PER_S] - slots[i] > 1000


# --- against the simulator's own rate limiter -------------------------------------------------

THURSDAY_14_IST = dt.datetime(2026, 11, 19, 14, 0, tzinfo=IST).timestamp()


@pytest.fixture
def strict_sim():
    market = SyntheticMarket(seed=3, now_fn=lambda: THURSDAY_14_IST)
    simulator = KiteSimulator(market=market, tick_interval_ms=1000, enforce_rate_limits=True)
    simulator.register_account(api_key=API_KEY, api_secret="x" * 32, access_token=ACCESS_TOKEN)
    with SimulatorThread(simulator) as thread:
        yield thread


def hammer(sim, limiters, calls_each: int) -> list[BaseException]:
    """Two clients on their own connections and limiters ask for candles at the same time."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(limiters))

    def run(limiter):
        # One attempt: a 429 would surface instead of being retried away.
        client = KiteRestClient(api_key=API_KEY, access_token=ACCESS_TOKEN, api_root=sim.http_url,
                                rate_limiter=limiter, retry_attempts=1)
        barrier.wait()
        try:
            for _ in range(calls_each):
                client.historical(256265, dt.date(2026, 11, 18), dt.date(2026, 11, 18), "day")
        except KiteNetworkError as exc:
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=run, args=(lim,)) for lim in limiters]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return errors


def test_clients_sharing_the_redis_limiter_stay_within_kites_limit(strict_sim, redis_client):
    # A wider margin than production's keeps a loaded CI machine's late wake-ups from
    # bunching two requests; the pacing itself is what is under test.
    limiters = [
        KiteRateLimiter(redis_client=redis.Redis.from_url(settings.REDIS_URL), margin=0.25)
        for _ in range(2)
    ]
    assert hammer(strict_sim, limiters, calls_each=4) == []
    assert strict_sim.call(lambda: strict_sim.sim.rest_requests["market.historical"]) == 8


def test_clients_with_separate_limiters_are_refused_by_kite(strict_sim):
    # The control: each client alone keeps 3/s, together they exceed it and Kite says 429.
    limiters = [KiteRateLimiter() for _ in range(2)]
    errors = hammer(strict_sim, limiters, calls_each=4)
    assert errors and all(e.status == 429 for e in errors)
