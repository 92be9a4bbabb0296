"""SIGTERM always ends runticker within its bound, even with PostgreSQL frozen mid-query.

A frozen server (SIGSTOPped, or a network that drops nothing but answers nothing) is played
by a TCP proxy in front of the real PostgreSQL that stops forwarding: sockets stay open, the
kernel acknowledges what is sent, no reply ever comes. No timeout of libpq fires then, so
a database thread of the engine is pinned for good.
"""

import select
import socket
import threading
import time

import pytest
from django.conf import settings

from streaming.models import EngineHeartbeat
from tests.helpers import wait_until
from tests.streaming.engine.runtime_helpers import ManagePy, subprocess_env

pytestmark = pytest.mark.django_db(transaction=True)

BOUND_S = 8.0


class FreezingProxy:
    """Forwards TCP to PostgreSQL until ``freeze()``; then holds every byte, both ways."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self._upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.frozen = threading.Event()
        self._stopped = threading.Event()
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def freeze(self) -> None:
        self.frozen.set()

    def close(self) -> None:
        self._stopped.set()
        for sock in self._sockets:
            sock.close()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self._upstream)
            self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peer = {a: b, b: a}
        while not self._stopped.is_set():
            if self.frozen.is_set():
                time.sleep(0.05)  # read nothing more: the other side waits for ever
                continue
            try:
                readable, _, _ = select.select([a, b], [], [], 0.05)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    peer[sock].sendall(data)
            except OSError:
                return


def test_sigterm_exits_within_the_bound_with_postgresql_frozen(tmp_path):
    db = settings.DATABASES["default"]
    proxy = FreezingProxy((db["HOST"] or "127.0.0.1", int(db["PORT"] or 5432)))
    env = subprocess_env(TICKER_HEARTBEAT_INTERVAL_S="0.5",
                         TICKER_SHUTDOWN_BOUND_S=str(BOUND_S))
    env["DATABASE_URL"] = env["DATABASE_URL"].replace(f":{db['PORT'] or 5432}/", f":{proxy.port}/")
    engine = ManagePy(["runticker", "--mock", "--engine-id", "frozen"], env=env,
                      log_path=tmp_path / "runticker.log")
    try:
        wait_until(lambda: EngineHeartbeat.objects.filter(engine_id__startswith="frozen").exists(),
                   timeout_s=60, what="runticker writing heartbeats through the proxy")
        proxy.freeze()
        time.sleep(2.0)  # heartbeats every 0.5 s: a database call is now pinned
        signalled = time.monotonic()
        code = engine.terminate(timeout_s=BOUND_S + 30)
        took_s = time.monotonic() - signalled
    finally:
        engine.stop()
        proxy.close()
    output = (tmp_path / "runticker.log").read_text(errors="replace")
    assert took_s < BOUND_S + 10, output[-3000:]
    assert code in (0, 70), output[-3000:]
