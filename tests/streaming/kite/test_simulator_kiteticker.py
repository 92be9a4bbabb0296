"""The official kiteconnect.KiteTicker against the simulator: proof that it speaks the protocol.

KiteTicker runs on Twisted's global reactor, which cannot be restarted in one process, so
each test runs it in a subprocess that prints one JSON line per event.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime
from functools import partial

import pytest

from streaming.market import SyntheticMarket
from streaming.sim.simulator import KiteSimulator, SimulatorThread
from tests import helpers

API_KEY, API_SECRET, ACCESS_TOKEN = "tickerkey", "tickersecret", "tickertoken"
TIMEOUT_S = 60

CLIENT = r"""
import json, sys
from kiteconnect import KiteTicker
from twisted.internet import reactor

root, api_key, access_token, tokens, full_ticks_wanted, reconnect = sys.argv[1:7]
tokens = json.loads(tokens)
full_ticks_wanted = int(full_ticks_wanted)
kws = KiteTicker(api_key, access_token, root=root, reconnect=reconnect == "1")
full = []

def emit(**event):
    print(json.dumps(event, default=str), flush=True)

def stop():
    if reactor.running:
        kws.stop_retry()
        reactor.stop()

def on_ticks(ws, ticks):
    for tick in ticks:
        emit(event="tick", **tick)
        if tick["mode"] == "full":
            full.append(tick)
    if len(full) >= full_ticks_wanted:
        stop()

def on_connect(ws, response):
    emit(event="connect")
    ws.subscribe(tokens)
    ws.set_mode(ws.MODE_FULL, tokens)

kws.on_ticks = on_ticks
kws.on_connect = on_connect
kws.on_error = lambda ws, code, reason: emit(event="error", code=code, reason=str(reason))
kws.on_close = lambda ws, code, reason: emit(event="close", code=code, reason=str(reason))
kws.on_reconnect = lambda ws, attempts: emit(event="reconnect", attempts=attempts)
kws.on_noreconnect = lambda ws: (emit(event="noreconnect"), stop())
if reconnect != "1":
    kws.on_close = lambda ws, code, reason: (emit(event="close", code=code, reason=str(reason)), stop())
kws.connect()
"""


@pytest.fixture
def sim():
    market = SyntheticMarket(seed=9, strikes_each_side=3)
    simulator = KiteSimulator(market=market, tick_interval_ms=50)
    simulator.register_account(api_key=API_KEY, api_secret=API_SECRET, access_token=ACCESS_TOKEN)
    with SimulatorThread(simulator) as thread:
        yield thread


wait_until = partial(helpers.wait_until, timeout_s=TIMEOUT_S, interval_s=0.01)


def client(sim, tokens, *, token=ACCESS_TOKEN, full_ticks=6, reconnect=False) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            CLIENT,
            sim.ws_url,
            API_KEY,
            token,
            json.dumps(tokens),
            str(full_ticks),
            "1" if reconnect else "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def events_of(process: subprocess.Popen) -> list[dict]:
    stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    assert process.returncode == 0, stderr
    return [json.loads(line) for line in stdout.splitlines()]


def test_kiteticker_connects_subscribes_sets_full_mode_and_parses_ticks(sim):
    option = next(r for r in sim.sim.market.instruments if r["segment"] == "NFO-OPT")
    tokens = [256265, option["instrument_token"]]
    events = events_of(client(sim, tokens, full_ticks=6))
    assert events[0] == {"event": "connect"}
    ticks = [e for e in events if e["event"] == "tick"]
    full = [t for t in ticks if t["mode"] == "full"]
    assert {t["instrument_token"] for t in full} == set(tokens)
    index = next(t for t in full if t["instrument_token"] == 256265)
    assert index["tradable"] is False
    assert 20_000 < index["last_price"] < 32_000
    assert set(index["ohlc"]) == {"open", "high", "low", "close"}
    assert datetime.fromisoformat(index["exchange_timestamp"]).year >= 2026
    contract = next(t for t in full if t["instrument_token"] == option["instrument_token"])
    assert contract["tradable"] is True
    assert len(contract["depth"]["buy"]) == len(contract["depth"]["sell"]) == 5
    assert contract["depth"]["buy"][0]["price"] < contract["last_price"] < contract["depth"]["sell"][0]["price"]
    assert contract["oi"] > 0
    # Before set_mode took effect the simulator sent quote packets, as Kite does.
    assert {t["mode"] for t in ticks} <= {"quote", "full"}
    wait_until(lambda: sim.call(sim.sim.connection_count, API_KEY) == 0)  # the client has gone
    assert sim.call(sim.sim.ticks_sent_to, API_KEY) >= len(ticks)


def test_kiteticker_gets_403_for_a_bad_token(sim):
    events = events_of(client(sim, [256265], token="bad"))
    errors = [e for e in events if e["event"] in ("error", "close")]
    assert errors and "403" in errors[0]["reason"]
    assert not [e for e in events if e["event"] == "tick"]
    assert sim.call(sim.sim.connection_attempts, API_KEY) == 1


@pytest.mark.timeout(TIMEOUT_S * 2)  # readline blocks: the timeout bounds a silent client
def test_kiteticker_reconnects_and_resubscribes_after_a_dropped_connection(sim):
    tokens = [260105]
    process = client(sim, tokens, full_ticks=10_000, reconnect=True)
    try:
        lines = iter(process.stdout.readline, "")
        deadline = time.monotonic() + TIMEOUT_S
        seen_full = False
        for line in lines:
            event = json.loads(line)
            if event["event"] == "tick" and event["mode"] == "full":
                seen_full = True
                break
            assert time.monotonic() < deadline
        assert seen_full
        assert sim.run(sim.sim.drop_connections(API_KEY)) == 1
        after: list[str] = []
        for line in lines:
            event = json.loads(line)
            after.append(event["event"])
            if after.count("connect") and event["event"] == "tick" and event["mode"] == "full":
                break
            assert time.monotonic() < deadline
        # KiteTicker saw a network failure, reconnected, resubscribed in full mode by itself.
        assert "close" in after and "connect" in after
        assert sim.call(sim.sim.subscriptions, API_KEY) == {260105: "full"}
        assert sim.call(sim.sim.connection_attempts, API_KEY) == 2
    finally:
        process.kill()
        process.communicate(timeout=TIMEOUT_S)
