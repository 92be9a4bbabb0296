"""Real redis-server and Redis Sentinel processes for the failover tests (Debian's redis-server;
a sentinel is `redis-server <conf> --sentinel`, which is all Debian's redis-sentinel package runs)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis

from tests.helpers import free_port

MASTER_NAME = "tpmaster"


class RedisCluster:
    """A master, a replica and one sentinel (quorum 1) on free loopback ports."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path
        self.master_port, self.replica_port, self.sentinel_port = free_port(), free_port(), free_port()
        self.procs: list[subprocess.Popen] = []

    def _server(self, name: str, args: list[str]) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server (Debian package redis-server) is needed"
        log = (self.dir / f"{name}.log").open("wb")
        self.procs.append(subprocess.Popen([binary, *args], cwd=self.dir, stdout=log, stderr=subprocess.STDOUT))
        log.close()

    def start(self) -> RedisCluster:
        common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(self.dir)]
        self._server("master", ["--port", str(self.master_port), *common])
        self._server("replica", ["--port", str(self.replica_port), *common,
                                 "--replicaof", "127.0.0.1", str(self.master_port)])
        conf = self.dir / "sentinel.conf"
        conf.write_text(
            f"port {self.sentinel_port}\nbind 127.0.0.1\ndir {self.dir}\n"
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master_port} 1\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} 2000\n"
            f"sentinel failover-timeout {MASTER_NAME} 10000\n"
        )
        self._server("sentinel", [str(conf), "--sentinel"])
        self.wait(lambda: self.replicas_known(), what="the sentinel sees the master and its replica")
        return self

    def sentinel(self) -> redis.Redis:
        return redis.Redis(port=self.sentinel_port, socket_timeout=2, decode_responses=True)

    def master_port_now(self) -> int | None:
        client = self.sentinel()
        try:
            address = client.execute_command("SENTINEL", "get-master-addr-by-name", MASTER_NAME)
            return int(address[1]) if address else None
        except redis.RedisError:
            return None
        finally:
            client.close()

    def replicas_known(self) -> bool:
        client = self.sentinel()
        try:
            replicas = client.execute_command("SENTINEL", "replicas", MASTER_NAME)
            return any("s_down" not in str(r) and "disconnected" not in str(r) for r in replicas)
        except redis.RedisError:
            return False
        finally:
            client.close()

    def kill_master(self) -> int:
        """SIGKILL the master, as a crash would; returns the promoted replica's port once the
        sentinel names it (after down-after-milliseconds and the election)."""
        old = self.master_port_now()
        assert old == self.master_port
        self.procs[0].kill()
        self.procs[0].wait()
        return self.wait(lambda: (p := self.master_port_now()) not in (None, old) and p,
                         what="the sentinel's new master", timeout_s=30)

    def env(self) -> dict[str, str]:
        return {"REDIS_SENTINELS": f"127.0.0.1:{self.sentinel_port}", "REDIS_SENTINEL_MASTER": MASTER_NAME}

    @staticmethod
    def wait(predicate, *, what: str, timeout_s: float = 30):
        deadline = time.monotonic() + timeout_s
        while True:
            value = predicate()
            if value:
                return value
            assert time.monotonic() < deadline, f"{what} not within {timeout_s} s"
            time.sleep(0.1)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
