"""End to end over real processes: ``manage.py replay`` serves a recording of the synthetic
market's Kite frames, ``manage.py runticker`` consumes it through the live protocol (its account
pointed at the replay's URL and credentials), daphne serves the WebSocket API, and a client
subscribing to the chain gets snapshots whose prices are the recording's last ones, with IV."""

import asyncio
import re
import time
import uuid

import numpy as np
import orjson
import pytest
from websockets.asyncio.client import connect

from accounts.services import apitoken_create
from streaming.kite.codec import decode_frame
from streaming.kite.recording import RecordingHeader, RecordingWriter, RecordKind
from streaming.market import SyntheticMarket
from streaming.sim.simulator import KiteSimulator
from tests.helpers import free_port, wait_until
from tests.streaming.engine.runtime_helpers import (
    ManagePy,
    instruments_from_market,
    make_account,
    subprocess_env,
    subscribe,
)
from tests.streaming.engine.test_runticker_e2e import Daphne, _http_ok, read_snapshots

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.heavy]

STEPS = 40
STEP_NS = 100_000_000


@pytest.fixture
def world(transactional_db):
    market = SyntheticMarket(seed=0)
    instruments_from_market(market)
    expiry = min(r["expiry"] for r in market.instruments
                 if r["name"] == "NIFTY" and r["instrument_type"] == "CE")
    tokens = sorted({r["instrument_token"] for r in market.instruments
                     if r["name"] == "NIFTY" and (r["expiry"] == expiry
                                                  or r["instrument_type"] == "FUT")}
                    | {market.index_token("NIFTY")})
    subscribe(tokens)
    make_account("acc1", api_key="replay-key", access_token="replay-token")
    from django.contrib.auth import get_user_model

    user = get_user_model().objects.create_user(username="trader", password="pw-123456")
    _token, key = apitoken_create(user=user, name="e2e")
    chain = {r["instrument_token"] for r in market.instruments
             if r["name"] == "NIFTY" and r["expiry"] == expiry and r["instrument_type"] in ("CE", "PE")}
    return {"market": market, "tokens": tokens, "expiry": expiry, "chain": chain, "key": key}


def record_market(path, market: SyntheticMarket, tokens: list[int]) -> dict[int, float]:
    """STEPS market steps of full-mode frames, as Kite would send them; the last prices."""
    sim = KiteSimulator(market=market)  # only its frame builder: never started
    rows, _ = market.locate(np.asarray(tokens, dtype=np.int64))
    lengths = market.packet_lengths(rows, "full")
    groups = [(rows[lengths == n], int(n)) for n in np.unique(lengths).tolist()]
    header = RecordingHeader(account="acc1", started_at_ns=time.time_ns(), file_index=0)
    writer = RecordingWriter(path, header=header, monotonic_start_ns=0)
    last: dict[int, float] = {}
    for step in range(STEPS):
        market.step()
        for frame in sim.build_frames(groups):
            writer.add(RecordKind.BINARY, step * STEP_NS, frame)
            ticks = decode_frame(frame).ticks
            last.update(zip(ticks["instrument_token"].tolist(), ticks["last_price"].tolist(),
                            strict=True))
    writer.close()
    return last


def test_runticker_consumes_a_replay_through_the_live_protocol(world, tmp_path):
    path = tmp_path / "acc1.tkrec"
    last = record_market(path, world["market"], world["tokens"])
    replay = ManagePy(["replay", str(path), "--port", "0", "--speed", "2",
                       "--api-key", "replay-key", "--access-token", "replay-token"],
                      env=subprocess_env(), log_path=tmp_path / "replay.log")
    engine = web = None
    try:
        url = wait_until(lambda: re.search(r"KITE_WS_URL=(\S+)", replay.output()),
                         timeout_s=60, what="the replay's URL").group(1)
        env = subprocess_env(KITE_WS_URL=url, CHANNEL_LAYER_PREFIX=f"rp{uuid.uuid4().hex[:8]}")
        engine = ManagePy(["runticker", "--no-mock"], env=env, log_path=tmp_path / "runticker.log")
        port = free_port()
        web = Daphne(port=port, env=env, log_path=tmp_path / "daphne.log")
        # The replay ends once runticker has taken every frame; it exits and says so.
        assert replay.proc.wait(timeout=120) == 0, replay.output()
        assert f"replayed {STEPS} messages" in replay.output()
        wait_until(lambda: _http_ok(port), timeout_s=60, what="daphne serving")
        snapshots = asyncio.run(_chain(port, world))
        for token in world["chain"]:
            snap = snapshots[token]
            assert snap["is_mock"] is False
            assert snap["ltp"] == last[token]
            assert 0.01 < snap["iv"] < 2.0
    finally:
        for proc in (replay, engine, web):
            if proc is not None:
                proc.stop()


async def _chain(port: int, world) -> dict[int, dict]:
    async with connect(
        f"ws://127.0.0.1:{port}/ws/v1/",
        additional_headers=[("Authorization", f"Token {world['key']}")],
        subprotocols=["tickerproj.v1"],
    ) as ws:
        assert orjson.loads(await asyncio.wait_for(ws.recv(), timeout=30))["type"] == "hello"
        await ws.send(orjson.dumps({
            "action": "subscribe", "id": "c",
            "chain": {"underlying": "NIFTY", "expiry": world["expiry"].isoformat()},
        }).decode())
        return await read_snapshots(ws, world["chain"], timeout_s=60)
