"""Reconnect pacing: against misbehaving servers the simulator does not imitate (one that
accepts the upgrade and closes at once, one that never answers the upgrade), and against the
simulator dropping a connection that worked, again and again."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial

import pytest
from tenacity import RetryCallState
from tenacity.wait import wait_base
from websockets.asyncio.server import ServerConnection, serve

from streaming.kite.limits import MODE_FULL
from streaming.kite.ticker import ConnectionState, KiteTickerClient
from streaming.market import SyntheticMarket
from streaming.sim.simulator import KiteSimulator
from tests.helpers import async_wait_until

WAIT_S = 30.0
TOKEN = 256265


class RecordingWait(wait_base):
    """A tenacity wait that records the attempt numbers it is asked about, and waits briefly."""

    def __init__(self) -> None:
        self.attempts: list[int] = []

    def __call__(self, retry_state: RetryCallState) -> float:
        self.attempts.append(retry_state.attempt_number)
        return 0.01


# Polls: client state, no event to wait on.
wait_until = partial(async_wait_until, timeout_s=WAIT_S, interval_s=0.01)


@pytest.fixture
async def accept_then_close():
    """A WebSocket server that completes every upgrade and closes straight away."""
    upgrades: list[str] = []

    async def handler(connection: ServerConnection) -> None:
        upgrades.append(connection.request.path)
        await connection.close()

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}/ws", upgrades


def client_for(url: str, wait: wait_base, **options) -> KiteTickerClient:
    return KiteTickerClient(
        api_key="k",
        access_token="secret-token",
        ws_url=url,
        on_ticks=lambda ticks: None,
        on_session_expired=lambda: None,
        wait=wait,
        **options,
    )


async def run_until(client: KiteTickerClient, predicate: Callable[[], bool]) -> None:
    task = asyncio.create_task(client.run())
    try:
        await wait_until(predicate)
    finally:
        await client.aclose()
        async with asyncio.timeout(WAIT_S):
            await task


async def test_server_that_accepts_then_closes_gets_growing_backoff(accept_then_close):
    url, upgrades = accept_then_close
    wait = RecordingWait()
    client = client_for(url, wait, backoff_reset_after_s=60.0)
    await client.set_subscriptions({TOKEN: MODE_FULL})
    await run_until(client, lambda: len(wait.attempts) >= 6)
    # Every connect succeeded, yet none stayed up: the attempt count keeps growing.
    assert wait.attempts[:6] == [1, 2, 3, 4, 5, 6]
    assert upgrades[0] == "/ws?api_key=k&access_token=secret-token"  # kiteconnect's URL format
    assert client.health().connections[0].reconnects >= 5


async def test_backoff_starts_over_after_a_connection_that_stayed_up(accept_then_close):
    url, _ = accept_then_close
    wait, after_drop = RecordingWait(), RecordingWait()
    # Zero: any connection counts as having stayed up long enough.
    client = client_for(url, wait, backoff_reset_after_s=0.0, wait_after_drop=after_drop)
    await client.set_subscriptions({TOKEN: MODE_FULL})
    await run_until(client, lambda: len(after_drop.attempts) >= 4)
    # Each drop of a connection that had stayed up reconnects at once, never after backoff.
    assert wait.attempts == []


async def test_twenty_drops_of_a_working_connection_never_reach_the_backoff():
    """Drops of a connection that had stayed up (a flapping network, not a refusing server)
    reconnect with the short drop wait each time, however many come in a row: the backoff's
    1-2 s first step (and its growth) is for connections that fail or close at once."""
    market = SyntheticMarket(seed=3, strikes_each_side=2)
    sim = KiteSimulator(market=market, tick_interval_ms=50, heartbeat_interval_ms=100)
    sim.register_account(api_key="k", api_secret="s", access_token="secret-token")
    wait, after_drop = RecordingWait(), RecordingWait()
    async with sim:
        client = client_for(sim.ws_url, wait, backoff_reset_after_s=0.2, wait_after_drop=after_drop)
        wanted = {TOKEN: MODE_FULL}
        await client.set_subscriptions(wanted)
        task = asyncio.create_task(client.run())
        try:
            for drop in range(20):
                await wait_until(lambda: sim.subscriptions("k") == wanted)
                await asyncio.sleep(0.25)  # up past backoff_reset_after_s: a working connection
                assert await sim.drop_connections("k") == 1
                await wait_until(lambda drop=drop: len(after_drop.attempts) == drop + 1)
            await wait_until(lambda: sim.subscriptions("k") == wanted)
        finally:
            await client.aclose()
            async with asyncio.timeout(WAIT_S):
                await task
    assert wait.attempts == []
    assert client.health().connections[0].reconnects == 20


async def test_aclose_cuts_a_pending_upgrade():
    """A server that takes the TCP connection and never answers: aclose() must not wait
    for connect_timeout_s."""
    accepted = asyncio.Event()
    writers: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        accepted.set()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = client_for(f"ws://127.0.0.1:{port}/ws", RecordingWait(), connect_timeout_s=600.0)
    await client.set_subscriptions({TOKEN: MODE_FULL})
    task = asyncio.create_task(client.run())
    try:
        async with asyncio.timeout(WAIT_S):
            await accepted.wait()
        assert client.health().connections[0].state is ConnectionState.CONNECTING
        async with asyncio.timeout(5.0):  # far below the 600 s connect timeout
            await client.aclose()
        assert task.done() and task.exception() is None
        assert client.health().connections[0].state is ConnectionState.CLOSED
    finally:
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()
