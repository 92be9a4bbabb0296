"""What daphne itself does with a frame over its 1 MiB limit (docs/websocket-protocol.md, Errors).

daphne's WebSocket server (autobahn) fails such a connection by dropping its TCP connection,
with no close frame: the client sees 1006, never 1009. Only that connection goes; the others
are served on. Found by the fault suite (``security.ws_abuse``); the docs had promised 1009.
"""

import asyncio

import orjson
import pytest
import websockets

from accounts.services import apitoken_create
from tests.helpers import free_port
from tests.streaming.wsutil import close_db_threads as close_db_threads
from tests.streaming.wsutil import daphne_process, service_env
from tests.streaming.wsutil import layer_prefix as layer_prefix
from tests.streaming.wsutil import user as user

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("close_db_threads")]

DAPHNE_MAX_MESSAGE_BYTES = 2**20
"""daphne's default ``--websocket-max-message-size``."""


@pytest.fixture
def daphne(layer_prefix, tmp_path):
    port = free_port()
    env = service_env(layer_prefix=layer_prefix, LOG_LEVEL="WARNING")
    server = daphne_process(port=port, env=env, log_dir=tmp_path).start(port=port)
    yield port
    server.stop()


def _connect(port: int, key: str):
    return websockets.connect(
        f"ws://127.0.0.1:{port}/ws/v1/", additional_headers={"Authorization": f"Token {key}"},
        ping_interval=None, max_queue=None,
    )  # fmt: skip


async def test_a_frame_over_daphnes_limit_drops_that_connection_and_no_other(daphne, user):
    from channels.db import database_sync_to_async

    _, key = await database_sync_to_async(apitoken_create)(user=user, name="transport")
    async with _connect(daphne, key) as bystander, _connect(daphne, key) as abuser:
        for ws in (bystander, abuser):
            assert orjson.loads(await ws.recv())["type"] == "hello"
        await abuser.send("x" * (DAPHNE_MAX_MESSAGE_BYTES + 1))
        await asyncio.wait_for(abuser.wait_closed(), 10)
        assert abuser.close_code == 1006  # dropped: no close frame came
        assert abuser.protocol.close_rcvd is None

        await bystander.send(orjson.dumps({"action": "ping", "id": "still"}).decode())
        reply = orjson.loads(await asyncio.wait_for(bystander.recv(), 10))
        assert (reply["type"], reply["id"]) == ("pong", "still")
