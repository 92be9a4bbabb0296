"""Recording and replay with the real engine over the simulator's WebSocket:

- an account with ``record_frames`` on has every raw frame it receives recorded (nothing of
  an account without it, no credential in the file), and switching it off stops the recording;
- the recording replayed twice through the replaying simulator, consumed by the real engine
  through the live protocol, publishes identical snapshots.

Determinism needs the engine's clock injected: it is frozen at ``T0`` while the recording
plays (receive stamps, times to expiry and staleness are then the same in both runs), then
stepped once by the chain-refresh interval so that every chain whose forward moved since its
last refresh is recomputed from the final state, as a running engine does a second later.
Which frames one flush coalesced differs between runs; what is published at the end does not.
"""

import asyncio
import time

import orjson
import pytest

from accounts.services import account_save
from streaming import schema
from streaming.engine.store import run_db
from streaming.kite.codec import decode_frame
from streaming.kite.recording import SUFFIX, RecordingReader, RecordKind
from streaming.market import SyntheticMarket
from streaming.sim.replay import ReplaySource
from streaming.sim.simulator import KiteSimulator
from subscriptions.models import Subscription
from tests.helpers import async_wait_until
from tests.streaming.engine.runtime_helpers import (
    InProcessEngine,
    instruments_from_market,
    make_account,
    subscribe,
)

pytestmark = pytest.mark.django_db(transaction=True)

API_KEY = "kite-key-acc1"
TOKEN = "tok-acc1"  # InProcessEngine registers f"tok-{label}" with the simulator


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
    account = make_account("acc1", api_key=API_KEY, access_token=TOKEN)
    account.record_frames = True
    account.save()
    return {"market": market, "tokens": tokens, "expiry": expiry, "account": account,
            "groups": [schema.chain_group("NIFTY", expiry), schema.underlying_group("NIFTY")]}


def read_recordings(directory) -> list:
    records = []
    for path in sorted(directory.rglob(f"*{SUFFIX}")):
        with RecordingReader(path) as reader:
            records += list(reader.records())
            assert reader.damage is None
    return records


def recorded_ticks(records) -> int:
    return sum(len(decode_frame(r.payload).ticks) for r in records if r.kind is RecordKind.BINARY)


def counter(engine, name: str, label: str) -> float:
    return getattr(engine.metrics, name).labels(label)._value.get()


async def record(world, directory, *, frames: int) -> None:
    """Run the engine on the synthetic simulator until ``frames`` tick frames are recorded."""
    async with InProcessEngine(accounts={"acc1": API_KEY}, recording_dir=directory) as h:
        await async_wait_until(lambda: counter(h.engine, "recorded_frames", "acc1") >= frames,
                               timeout_s=90, what=f"{frames} frames recorded")


@pytest.fixture
def second_account(world):
    """acc2, not recording, streams the first five instruments (pinned to it)."""
    other = make_account("acc2", api_key="kite-key-acc2", access_token="tok-acc2")
    Subscription.objects.filter(instrument_id__in=world["tokens"][:5]).update(pinned_account=other)
    return other


async def test_an_opted_in_account_records_every_raw_frame_and_others_nothing(
    world, second_account, tmp_path
):
    async with InProcessEngine(accounts={"acc1": API_KEY, "acc2": "kite-key-acc2"},
                               recording_dir=tmp_path) as h:
        await async_wait_until(lambda: counter(h.engine, "recorded_frames", "acc1") >= 20,
                               timeout_s=90, what="20 frames recorded")
        assert h.engine.connections.recorded() == {world["account"].pk}
        # Switched off in the admin (the service tells the engine): the file is closed.
        account = world["account"]
        account.record_frames = False
        await run_db(account_save, account=account)
        await async_wait_until(lambda: not h.engine.connections.recorded(), timeout_s=60,
                               what="recording stopped")
        stopped_at = counter(h.engine, "recorded_frames", "acc1")
        ticks_at = h.engine.intake.accounts[account.pk].ticks
        await async_wait_until(
            lambda: h.engine.intake.accounts[account.pk].ticks > ticks_at + 200,
            timeout_s=60, what="acc1 streaming on")
        assert counter(h.engine, "recorded_frames", "acc1") == stopped_at
    assert [p.name for p in tmp_path.iterdir()] == ["acc1"]
    records = read_recordings(tmp_path)
    assert len(records) == stopped_at
    tokens = set()
    for r in records:
        if r.kind is RecordKind.BINARY:
            tokens |= set(decode_frame(r.payload).ticks["instrument_token"].tolist())
    assert tokens and tokens <= set(world["tokens"][5:])  # acc2's pinned tokens are not there
    times = [r.received_ns for r in records]
    assert times == sorted(times)
    for path in tmp_path.rglob(f"*{SUFFIX}"):
        raw = path.read_bytes()
        assert API_KEY.encode() not in raw and TOKEN.encode() not in raw
    contents = b"".join(r.payload for r in records)
    assert API_KEY.encode() not in contents and TOKEN.encode() not in contents


class SteppedClock:
    """The engine's wall clock, moved only by the test."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def published_after_replay(world, paths, *, expected_ticks: int, t0: float) -> dict:
    """Replay ``paths`` into a fresh engine; the snapshots it published, once all is done."""
    start = asyncio.Event()
    sim = KiteSimulator(market=SyntheticMarket(seed=0), replay=ReplaySource(paths, speed=4.0),
                        replay_start=start)
    clock = SteppedClock(t0)
    h = InProcessEngine(accounts={"acc1": API_KEY}, sim=sim, clock=clock)
    listener = await h.listen(*world["groups"])
    async with h:
        engine = h.engine
        # Nothing is published to a group before the engine has seen its listeners (within
        # its watched-groups refresh): the replay starts once it has, and the engine has
        # subscribed.
        await async_wait_until(
            lambda: engine.publisher.watched is not None
            and set(world["groups"]) <= engine.publisher.watched
            and len(sim.subscriptions(API_KEY)) == len(world["tokens"]),
            timeout_s=60, what="engine subscribed and watching the listener's groups")
        start.set()
        await async_wait_until(sim.replay_finished.is_set, timeout_s=120, what="replay sent")
        await async_wait_until(lambda: engine.intake.ticks_total == expected_ticks,
                               timeout_s=60, what="every recorded tick taken in")

        async def engine_latest() -> dict:
            tokens, items = await engine.worker.reads.latest(world["tokens"])
            return {t: orjson.loads(i) for t, i in zip(tokens, items, strict=True)}

        async def caught_up() -> bool:
            if engine.worker.inbox_bytes:
                return False
            await listener.drain(0.05)
            return listener.latest == await engine_latest()

        await async_wait_until(caught_up, timeout_s=60, what="published = engine state")
        options = [t for t, s in listener.latest.items()
                   if s["kind"] in ("CE", "PE") and s["iv"] is not None]
        assert len(options) > 20
        stepped_at = time.monotonic()
        clock.now = t0 + 1.0  # one chain-refresh interval
        await listener.until(lambda: all(listener.received_at[t] > stepped_at for t in options),
                             timeout_s=60, what="every option republished after the step")
        await async_wait_until(caught_up, timeout_s=60, what="published = engine state")
        assert engine.metrics.dropped.labels("unknown_token")._value.get() == 0
    sim.replay.close()
    assert sim.replay.damage is None
    return listener.latest


async def test_a_recording_replayed_twice_publishes_identical_snapshots(world, tmp_path):
    await record(world, tmp_path, frames=30)
    paths = sorted(tmp_path.rglob(f"*{SUFFIX}"))
    records = read_recordings(tmp_path)
    expected = recorded_ticks(records)
    assert expected > 0
    t0 = float(int(time.time()))
    first = await published_after_replay(world, paths, expected_ticks=expected, t0=t0)
    second = await published_after_replay(world, paths, expected_ticks=expected, t0=t0)
    assert set(first) == set(world["tokens"])
    assert first == second
    # Live data replayed, not the mock market.
    assert {s["is_mock"] for s in first.values()} == {False}
    assert {"CE", "PE", "FUT"} <= {s["kind"] for s in first.values()}
