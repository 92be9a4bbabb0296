"""The suite's own TCP proxy: product processes reach PostgreSQL, Redis and the simulator
through it, so a scenario can delay, reset or black-hole a link without firewall rules.

Every proxy of a deployment runs in ONE helper process (``ProxyServer``, started with
multiprocessing): the bytes of the whole deployment then never compete with the runner's
probe for the runner's GIL. The runner drives each link through a :class:`Proxy` handle.

Modes:
- ``pass``: bytes flow both ways.
- ``delay``: each chunk is forwarded ``delay_ms`` later (order kept).
- ``reset``: every open connection is reset (RST) and new ones are reset on accept.
- ``blackhole``: connections stay open but no byte moves either way (new ones too), as a
  dropped route looks; returning to ``pass`` lets the held bytes through.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Literal

Mode = Literal["pass", "delay", "reset", "blackhole"]
MODES = ("pass", "delay", "reset", "blackhole")
_CHUNK = 65536


@dataclass(frozen=True)
class ProxySpec:
    name: str
    listen_port: int
    target_port: int
    host: str = "127.0.0.1"


class _Link:
    """One listening proxy inside the helper process."""

    def __init__(self, spec: ProxySpec) -> None:
        self.spec = spec
        self.mode: Mode = "pass"
        self.delay_s = 0.0
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(
            self._accept, self.spec.host, self.spec.listen_port, reuse_address=True
        )

    def set_mode(self, mode: Mode, delay_ms: int) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown proxy mode {mode!r}; expected one of {MODES}")
        self.mode = mode
        self.delay_s = max(0, delay_ms) / 1000.0
        if mode == "blackhole":
            self.flowing.clear()
        else:
            self.flowing.set()
        if mode == "reset":
            for pair in list(self.pairs):
                for writer in pair:
                    _reset(writer)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "reset":
            _reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.spec.host, self.spec.target_port)
        except OSError:
            _reset(writer)
            return
        pair = (writer, up_writer)
        self.pairs.add(pair)
        try:
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        finally:
            self.pairs.discard(pair)
            for w in pair:
                w.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(_CHUNK):
                await self.flowing.wait()
                if self.mode == "delay" and self.delay_s:
                    await asyncio.sleep(self.delay_s)
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            pass
        finally:
            # Either side closing ends the pair: the other pump sees EOF or a reset next.
            with contextlib.suppress(Exception):
                writer.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), not FIN: what a reset link looks like to both ends."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def serve(specs: list[ProxySpec], control) -> None:
    """The helper process: serve every link; answer ``control`` (a Pipe end) until "stop"."""
    asyncio.run(_serve(specs, control))


async def _serve(specs: list[ProxySpec], control) -> None:
    loop = asyncio.get_running_loop()
    links = {spec.name: _Link(spec) for spec in specs}
    for link in links.values():
        await link.start()
    control.send(("ready", None))
    while True:
        command = await loop.run_in_executor(None, control.recv)
        op = command[0]
        try:
            if op == "stop":
                control.send(("ok", None))
                return
            if op == "mode":
                _, name, mode, delay_ms = command
                links[name].set_mode(mode, delay_ms)
                control.send(("ok", None))
            elif op == "connections":
                control.send(("ok", len(links[command[1]].pairs)))
            else:
                control.send(("error", f"unknown command {op!r}"))
        except (KeyError, ValueError) as exc:
            control.send(("error", str(exc)))


class ProxyProcess:
    """The helper process of every proxy and the one pipe to it (calls serialised by a lock)."""

    def __init__(self, specs: list[ProxySpec], *, start_timeout_s: float = 30.0) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._lock = threading.Lock()
        self.process = ctx.Process(target=serve, args=(specs, child), name="faults-proxy", daemon=True)
        self.process.start()
        if not self._conn.poll(start_timeout_s):
            self.process.kill()
            raise TimeoutError(f"the proxy process did not start within {start_timeout_s} s")
        self._conn.recv()
        self.proxies = {spec.name: Proxy(self, spec) for spec in specs}

    def call(self, *command, timeout_s: float = 10.0):
        with self._lock:
            self._conn.send(command)
            if not self._conn.poll(timeout_s):
                raise TimeoutError(f"proxy process did not answer {command[0]!r} within {timeout_s} s")
            status, value = self._conn.recv()
        if status != "ok":
            raise ValueError(value)
        return value

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.process.is_alive():
            with contextlib.suppress(Exception):
                self.call("stop", timeout_s=timeout_s)
            self.process.join(timeout_s)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout_s)


class Proxy:
    """A handle on one link of the proxy process."""

    def __init__(self, owner: ProxyProcess, spec: ProxySpec) -> None:
        self._owner = owner
        self.spec = spec
        self.name = spec.name
        self.port = spec.listen_port
        self.target_port = spec.target_port
        self.mode: Mode = "pass"

    def set_mode(self, mode: Mode, delay_ms: int = 0) -> None:
        self._owner.call("mode", self.name, mode, int(delay_ms))
        self.mode = mode

    def connections(self) -> int:
        """Connections open through this link now."""
        return self._owner.call("connections", self.name)
