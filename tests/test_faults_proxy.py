"""The fault suite's TCP proxy (faults/proxy.py) between a client and an echo server: bytes
pass, are delayed, held by a black hole and let through after it, and links are reset."""

import socket
import socketserver
import threading
import time

import pytest

from faults.deployment import PortPicker
from faults.proxy import ProxyProcess, ProxySpec
from tests.helpers import wait_until


class _Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def proxy():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = PortPicker().take()
    process = ProxyProcess([ProxySpec(name="echo", listen_port=port,
                                      target_port=server.server_address[1])])
    try:
        yield process.proxies["echo"]
    finally:
        process.stop()
        server.shutdown()
        server.server_close()


def _connect(proxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.settimeout(10)
    return sock


def _round_trip(sock: socket.socket, payload: bytes = b"ping") -> bytes:
    sock.sendall(payload)
    return sock.recv(65536)


def test_pass_delay_and_connection_count(proxy):
    with _connect(proxy) as sock:
        assert _round_trip(sock) == b"ping"
        assert proxy.connections() == 1
        proxy.set_mode("delay", delay_ms=300)
        began = time.monotonic()
        assert _round_trip(sock) == b"ping"
        assert time.monotonic() - began >= 0.6  # 300 ms each way
    wait_until(lambda: proxy.connections() == 0, timeout_s=10, what="the link closed")


def test_a_black_hole_holds_the_bytes_and_pass_lets_them_through(proxy):
    with _connect(proxy) as sock:
        assert _round_trip(sock) == b"ping"
        proxy.set_mode("blackhole")
        sock.sendall(b"held")
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.recv(65536)
        proxy.set_mode("pass")
        sock.settimeout(10)
        assert sock.recv(65536) == b"held"


def test_reset_cuts_open_links_and_refuses_new_ones_until_pass(proxy):
    with _connect(proxy) as sock:
        assert _round_trip(sock) == b"ping"
        proxy.set_mode("reset")
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            for _ in range(5):  # the RST may land after the first send
                if not _round_trip(sock):
                    raise ConnectionResetError("closed")
                time.sleep(0.05)
    with pytest.raises((ConnectionResetError, BrokenPipeError)), _connect(proxy) as sock:
        if not _round_trip(sock):
            raise ConnectionResetError("closed")
    proxy.set_mode("pass")
    with _connect(proxy) as sock:
        assert _round_trip(sock) == b"ping"


def test_an_unknown_mode_is_refused_by_name(proxy):
    with pytest.raises(ValueError, match="unknown proxy mode 'sideways'"):
        proxy.set_mode("sideways")
