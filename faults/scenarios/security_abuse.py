"""Input abuse: hostile WebSocket frames and connect floods, and history/API requests at and
past their limits. Each abuse must get its documented answer (docs/websocket-protocol.md,
"Errors"; docs/security.md, H1 and M6) while a bystander keeps being served."""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from websockets.exceptions import ConnectionClosed

from faults.registry import Outcome, Promise, scenario
from faults.scenarios.security_client import Http, ws_open, ws_recv, ws_until

ABUSE_IP = "127.0.0.31"
FLOOD_IP = "127.0.0.32"
BYSTANDER_IP = "127.0.0.33"
HISTORY_IP = "127.0.0.34"

BYSTANDER_PING_S = 0.1
BYSTANDER_PING_TIMEOUT_S = 2.0
BYSTANDER_P99_FLOOR_MS = 1000.0
BYSTANDER_P99_FACTOR = 3.0
"""The bystander's pings (WebSocket) and /health/live (HTTP) during the abuse: all answered,
p99 within 3x its own p99 before the abuse (or under a second): what the abuse costs others,
not what the machine's load costs everyone."""
BYSTANDER_BASELINE_S = 3.0
DAPHNE_RSS_GROWTH_PROMISE_MB = 128.0
"""Each connection holds at most ~512 KiB of unread input (docs/security.md, H1); the abuse
opens a few hundred short connections at most."""
FLOOD_CONNECTS = 300
RATE_TEST_SECONDS = 3
RATE_TEST_PER_S = 100
DEEP_NESTING = 50_000
HISTORY_CONCURRENT = 20
HISTORY_MAX_DAYS = 132
"""Whole days from the first to the last: 133 x 375 = 49,875 minute candles, just under the
50,000 a request may ask."""
HISTORY_RATE_PER_MINUTE = 30
HISTORY_TIMEOUT_S = 600.0
"""A maximal option range (3 Kite calls at Kite's 3 a second, IV and Greeks of ~50,000
candles) takes tens of seconds on a loaded machine: measured, not cut off."""


def _token_for(name: str, scopes=("read",)) -> str:
    from django.contrib.auth import get_user_model

    from accounts.services import apitoken_create

    user = get_user_model().objects.create_user(username=f"sec-{name}-{secrets.token_hex(3)}")
    return apitoken_create(user=user, name=name, scopes=list(scopes))[1]


def _p99(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 1)


@dataclass
class Bystander:
    """A well-behaved client beside the abuse: WebSocket pings and /health/live."""

    ws_url: str
    http_url: str
    key: str
    ping_ms: list[float] = field(default_factory=list)
    http_ms: list[float] = field(default_factory=list)
    missed: int = 0
    http_5xx: int = 0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _abuse_from: tuple[int, int] = (0, 0)  # samples before the abuse began (ping, http)

    def abuse_begins(self) -> None:
        self._abuse_from = (len(self.ping_ms), len(self.http_ms))

    async def run(self) -> None:
        await asyncio.gather(self._pings(), self._health())

    def stop(self) -> None:
        self._stop.set()

    async def _pings(self) -> None:
        ws = await ws_open(self.ws_url, local_ip=BYSTANDER_IP,
                           headers={"Authorization": f"Token {self.key}"})
        if not hasattr(ws, "send"):
            self.missed += 1
            return
        await ws_recv(ws, timeout_s=10)  # hello
        n = 0
        while not self._stop.is_set():
            n += 1
            sent = time.monotonic()
            try:
                await ws.send(orjson.dumps({"action": "ping", "id": n}).decode())
            except ConnectionClosed:
                self.missed += 1
                return
            reply, _ = await ws_until(ws, lambda m, n=n: m.get("id") == n, timeout_s=BYSTANDER_PING_TIMEOUT_S)
            if reply is None:
                self.missed += 1
            else:
                self.ping_ms.append((time.monotonic() - sent) * 1000)
            await asyncio.sleep(BYSTANDER_PING_S)
        await ws.close()

    async def _health(self) -> None:
        async with Http(self.http_url, local_ip=BYSTANDER_IP) as http:
            while not self._stop.is_set():
                answer = await http.request("GET", "/health/live")
                self.http_ms.append(answer.ms)
                self.http_5xx += answer.status >= 500
                await asyncio.sleep(BYSTANDER_PING_S * 2)

    def _split(self, values: list[float], begin: int) -> tuple[float | None, float | None]:
        return _p99(values[:begin]), _p99(values[begin:])

    def figures(self) -> dict[str, Any]:
        ping_before, ping_during = self._split(self.ping_ms, self._abuse_from[0])
        http_before, http_during = self._split(self.http_ms, self._abuse_from[1])
        return {"bystander_ping_p99_ms": ping_during, "before": ping_before,
                "bystander_http_p99_ms": http_during, "http_before": http_before,
                "bystander_missed": self.missed, "bystander_5xx": self.http_5xx}

    def promises(self) -> list[Promise]:
        held, details = self.missed == 0, [f"missed {self.missed}"]
        for what, values, begin in (("ping", self.ping_ms, self._abuse_from[0]),
                                    ("http", self.http_ms, self._abuse_from[1])):
            before, during = self._split(values, begin)
            bound = max(BYSTANDER_P99_FLOOR_MS, BYSTANDER_P99_FACTOR * (before or 0.0))
            held = held and during is not None and during <= bound
            details.append(f"{what} p99 {during} ms (bound {bound:.0f})")
        return [
            Promise("bystander served (nothing lost, p99 <= max(1 s, 3x before))", held=held,
                    detail=", ".join(details)),
            Promise("no 5xx", held=self.http_5xx == 0, detail=str(self.http_5xx)),
        ]  # fmt: skip


async def _with_bystander(dep, key: str, work: Callable[[], Awaitable[Any]]) -> tuple[Any, Bystander]:
    bystander = Bystander(dep.ws_url, dep.http_url, key)
    task = asyncio.create_task(bystander.run(), name="security-bystander")
    try:
        await asyncio.sleep(BYSTANDER_BASELINE_S)
        bystander.abuse_begins()
        result = await work()
        await asyncio.sleep(1.0)
    finally:
        bystander.stop()
        await task
    return result, bystander


def _daphne_rss_growth(dep, since: float, until: float) -> float | None:
    samples = [s.rss_mb.get("daphne") for s in dep.probe.samples(since, until)]
    samples = [s for s in samples if s is not None]
    if not samples:
        return None
    return round(max(samples) - samples[0], 1)


# --- WebSocket abuse -----------------------------------------------------------------------


@dataclass(frozen=True)
class Abuse:
    label: str
    frames: Callable[[], list[str | bytes]]
    expect_codes: frozenset[str]  # error codes that are the documented answer
    expect_close: frozenset[int] = frozenset()  # documented close codes (empty: stays open)
    paced_per_s: float | None = None


def _abuses() -> list[Abuse]:
    small = orjson.dumps({"action": "subscribe", "id": "big", "instruments": list(range(1, 20_001))})
    wide = orjson.dumps({"action": "subscribe", "id": "wide",
                         "instruments": list(range(10_000_000, 10_020_000))})
    ping = orjson.dumps({"action": "ping", "id": 1}).decode()
    return [
        Abuse("subscribe 20k tokens", lambda: [small.decode()], frozenset({"too_many_subscriptions"})),
        Abuse("subscribe 20k tokens over 128 KiB", lambda: [wide.decode()], frozenset({"message_too_large"})),
        Abuse("100 msg/s", lambda: [ping] * (RATE_TEST_PER_S * RATE_TEST_SECONDS),
              frozenset({"rate_limited", "flood"}), frozenset({4008}), paced_per_s=RATE_TEST_PER_S),
        Abuse("500 frames at once", lambda: [ping] * 500, frozenset({"rate_limited", "flood"}),
              frozenset({4008})),
        Abuse("200 KiB text frame", lambda: ["x" * 200 * 1024], frozenset({"message_too_large"})),
        Abuse("1.1 MiB frame", lambda: ["x" * int(1.1 * 2**20)], frozenset(), frozenset({1006})),  # dropped by daphne
        Abuse("binary frame", lambda: [secrets.token_bytes(512)], frozenset({"invalid_message"})),
        Abuse("deep nesting", lambda: ["[" * DEEP_NESTING + "]" * DEEP_NESTING],
              frozenset({"invalid_json"})),
        Abuse("deep nesting in a subscribe", lambda: [
            '{"action":"subscribe","instruments":' + "[" * DEEP_NESTING + "]" * DEEP_NESTING + "}"],
              frozenset({"invalid_json", "invalid_message"})),
    ]  # fmt: skip


async def _one_abuse(dep, key: str, abuse: Abuse) -> str | None:
    """None when the answer was the documented one, else what happened instead."""
    ws = await ws_open(dep.ws_url, local_ip=ABUSE_IP, headers={"Authorization": f"Token {key}"})
    if not hasattr(ws, "send"):
        return f"could not connect ({ws.handshake_status} {ws.error})"
    await ws_recv(ws, timeout_s=10)  # hello
    try:
        for frame in abuse.frames():
            await ws.send(frame)
            if abuse.paced_per_s:
                await asyncio.sleep(1 / abuse.paced_per_s)
    except ConnectionClosed:
        pass  # the server closed on us mid-abuse: judged by its close code below
    # Then a ping: an open socket must still answer it.
    try:
        await asyncio.sleep(1.1)  # past the rate limiter's second
        await ws.send(orjson.dumps({"action": "ping", "id": "after"}).decode())
    except ConnectionClosed:
        pass
    _, seen = await ws_until(ws, lambda m: m.get("id") == "after" and m.get("type") == "pong", timeout_s=10)
    codes = {m.get("code") for m in seen if m.get("type") == "error"}
    unexpected = codes - abuse.expect_codes
    await asyncio.sleep(0)
    closed = ws.close_code
    if closed is None and abuse.expect_close and not abuse.expect_codes:
        closed = await _wait_close(ws)
    await ws.close()
    if unexpected:
        return f"error codes {sorted(unexpected)}"
    if closed is not None and closed not in abuse.expect_close:
        return f"closed {closed}"
    if closed is None and not any(m.get("id") == "after" for m in seen):
        return "open but no longer answering"
    if closed is None and abuse.expect_codes and not codes:
        return "no error sent"
    if closed is None and not abuse.expect_codes and abuse.expect_close:
        return "not closed"
    return None


async def _wait_close(ws) -> int | None:
    try:
        await asyncio.wait_for(ws.wait_closed(), 10)
    except TimeoutError:
        return None
    return ws.close_code


async def _connect_flood(dep) -> tuple[int, list[str]]:
    """FLOOD_CONNECTS connects without a credential at once: each refused as documented."""
    async def one() -> str | None:
        opened = await ws_open(dep.ws_url, local_ip=FLOOD_IP)
        if not hasattr(opened, "send"):
            return None if opened.handshake_status == 403 else f"handshake {opened.handshake_status} {opened.error}"
        first = await ws_recv(opened, timeout_s=15)
        code = await _wait_close(opened)
        if first is None or first.get("code") != "unauthorized" or code != 4401:
            return f"{str(first)[:60]} close {code}"
        return None

    outcomes = await asyncio.gather(*(one() for _ in range(FLOOD_CONNECTS)))
    return len(outcomes), [o for o in outcomes if o is not None]


@scenario("security.ws_abuse", group="security")
def ws_abuse(dep) -> Outcome:
    """20k-token subscribes, 100 msg/s, bursts, 200 KiB and 1.1 MiB frames, binary, deep
    nesting, 300 unauthenticated connects: each its documented answer, a bystander served."""
    key = _token_for("abuse")
    bystander_key = _token_for("bystander")
    since = time.monotonic()

    async def work() -> tuple[list[str], tuple[int, list[str]]]:
        wrong = []
        for abuse in _abuses():
            if (what := await _one_abuse(dep, key, abuse)) is not None:
                wrong.append(f"{abuse.label}: {what}")
        flood = await _connect_flood(dep)
        return wrong, flood

    (wrong, (flood_n, flood_wrong)), bystander = asyncio.run(_with_bystander(dep, bystander_key, work))
    growth = _daphne_rss_growth(dep, since, time.monotonic())
    return Outcome(
        figures={"abuses": len(_abuses()), "imprecise": len(wrong), "flood_connects": flood_n,
                 "flood_imprecise": len(flood_wrong), **bystander.figures(), "daphne_rss_growth_mb": growth},
        promises=[
            Promise("each abuse gets its documented error or close code", held=not wrong,
                    detail="; ".join(wrong) or "all precise"),
            Promise("unauthenticated flood refused (403 or 4401)", held=not flood_wrong,
                    detail="; ".join(sorted(set(flood_wrong))[:3]) or "all"),
            *bystander.promises(),
            Promise(f"daphne RSS growth <= {DAPHNE_RSS_GROWTH_PROMISE_MB:.0f} MiB",
                    held=growth is not None and growth <= DAPHNE_RSS_GROWTH_PROMISE_MB, detail=f"{growth} MiB"),
        ],
    )  # fmt: skip


# --- history / API abuse -------------------------------------------------------------------


EXTREME_RANGES = [
    ("0001-01-01", "0001-01-02"), ("9999-12-30", "9999-12-31"), ("1900-01-01", "1900-01-02"),
    ("2026-13-45", "2026-13-46"), ("+275760-09-13", "2026-01-01"), ("0001-01-01T00:00:00+23:59", "2026-01-02"),
    ("2026-01-01", "9999-12-31T23:59:59-23:59"), ("2000-01-01", "2100-01-01"), ("2026-02-01", "2026-01-01"),
    ("nan", "inf"), ("", ""), ("2" * 10_000, "2026-01-01"), ("2026-01-01T25:61:00", "2026-01-02"),
    ("1970-01-01T00:00:00Z", "2026-01-01"), ("2026-01-01\x00", "2026-01-02"),
]  # fmt: skip
"""Dates at, past and around the limits; each must be a 4xx with a code, never a 5xx."""


def _instrument_tokens() -> tuple[int, int]:
    """An option (IV and Greeks per candle: the costliest history) and an index."""
    from subscriptions.models import Instrument

    option = Instrument.objects.filter(instrument_type=Instrument.Type.CALL).order_by("pk").first()
    index = Instrument.objects.filter(instrument_type=Instrument.Type.EQUITY).order_by("pk").first()
    fallback = Instrument.objects.order_by("pk").first()
    return (option or fallback).pk, (index or fallback).pk


def _history_path(token: int, start: str, end: str, interval: str = "minute") -> str:
    from urllib.parse import urlencode

    return f"/api/v1/history/{token}?" + urlencode({"from": start, "to": end, "interval": interval})


@scenario("security.history_abuse", group="security")
def history_abuse(dep) -> Outcome:
    """Extreme dates, the per-token rate, 20 maximal option ranges from one caller and from
    20: 4xx with a code, the limits hold, no 5xx, a bystander served."""
    option, index = _instrument_tokens()
    keys = [_token_for(f"history{n}") for n in range(HISTORY_CONCURRENT)]
    dates_key, rate_key = _token_for("dates"), _token_for("rate")
    one_key, bystander_key = _token_for("one"), _token_for("hbystander")
    end = dt.date(2026, 11, 27)  # a fixed past day: the range never depends on today
    start = end - dt.timedelta(days=HISTORY_MAX_DAYS)
    maximal = _history_path(option, start.isoformat(), end.isoformat())

    async def work() -> dict[str, Any]:
        found: dict[str, Any] = {"bad_dates": [], "5xx": [], "statuses": {}}
        async with Http(dep.http_url, local_ip=HISTORY_IP, limit=64, timeout_s=HISTORY_TIMEOUT_S) as http:
            for lo, hi in EXTREME_RANGES:
                answer = await http.request("GET", _history_path(index, lo, hi),
                                            headers={"Authorization": f"Token {dates_key}"})
                if not 400 <= answer.status < 500 or b'"code"' not in answer.body:
                    found["bad_dates"].append(f"{lo[:24]!r}..{hi[:24]!r}: {answer.status}")
            # The per-token rate limit: past 30 a minute, 429 with Retry-After.
            limited = 0
            for _ in range(HISTORY_RATE_PER_MINUTE + 5):
                answer = await http.request("GET", _history_path(index, "0001-01-01", "0001-01-02"),
                                            headers={"Authorization": f"Token {rate_key}"})
                limited += answer.status == 429
            found["rate_limited"] = limited
            # One caller, 20 at once: at most 2 in flight, the rest refused at once.
            one = await asyncio.gather(*(http.request("GET", maximal, headers={"Authorization": f"Token {one_key}"})
                                         for _ in range(HISTORY_CONCURRENT)))
            found["one_caller_429"] = sum(a.status == 429 for a in one)
            found["one_caller_429_ms_max"] = round(max((a.ms for a in one if a.status == 429), default=0))
            # Twenty callers at once, each its own maximal range.
            started = time.monotonic()
            many = await asyncio.gather(*(http.request("GET", maximal, headers={"Authorization": f"Token {k}"})
                                          for k in keys))
            found["many_s"] = round(time.monotonic() - started, 1)
            found["many_200"] = sum(a.status == 200 for a in many)
            found["many_busy"] = sum(a.status == 429 and b"server_busy" in a.body for a in many)
            found["maximal_s_max"] = round(max(a.ms for a in [*one, *many]) / 1000, 1)
            for answer in [*one, *many]:
                found["statuses"][answer.status] = found["statuses"].get(answer.status, 0) + 1
                if answer.status >= 500:
                    found["5xx"].append(f"{answer.status} {answer.body[:120]!r}")
        return found

    found, bystander = asyncio.run(_with_bystander(dep, bystander_key, work))
    min_429 = HISTORY_CONCURRENT - 2
    return Outcome(
        figures={"extreme_ranges": len(EXTREME_RANGES), "not_4xx": len(found["bad_dates"]),
                 "rate_429": found["rate_limited"], "one_caller_429": found["one_caller_429"],
                 "one_caller_429_ms_max": found["one_caller_429_ms_max"], "20_callers_s": found["many_s"],
                 "20_callers_200": found["many_200"], "20_callers_busy": found["many_busy"],
                 "maximal_s_max": found["maximal_s_max"],
                 "statuses": found["statuses"], "http_5xx": len(found["5xx"]), **bystander.figures()},
        promises=[
            Promise("extreme dates are a 4xx with a code", held=not found["bad_dates"],
                    detail="; ".join(found["bad_dates"][:4]) or "all"),
            Promise("30/min per token holds", held=found["rate_limited"] >= 5, detail=f"{found['rate_limited']} x 429"),
            Promise("2 in flight per caller holds", held=found["one_caller_429"] >= min_429,
                    detail=f"{found['one_caller_429']} of {HISTORY_CONCURRENT} refused"),
            Promise("20 callers: each 200 or 429 server_busy (the process-wide cap)",
                    held=found["many_200"] > 0 and found["many_200"] + found["many_busy"] == HISTORY_CONCURRENT,
                    detail=f"{found['many_200']} x 200, {found['many_busy']} x server_busy of {HISTORY_CONCURRENT}"),
            Promise("no 5xx", held=not found["5xx"], detail="; ".join(found["5xx"][:3]) or "0"),
            *bystander.promises(),
        ],
    )  # fmt: skip

