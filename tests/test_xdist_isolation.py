"""The suite runs in parallel (pytest-xdist, `make test`): each worker, and every process its
tests start, has a test database, a Redis database, a channel-layer prefix, a var/ directory
and a block of ports of its own; without xdist nothing changes. Checked on a real inner run of
tests/xdist_probe.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import worker_redis_url
from tests.helpers import PORT_BLOCK_SIZE, PORT_BLOCKS_START

ROOT = Path(__file__).resolve().parents[1]
# The probe reads settings and binds a port; it writes nothing to Redis, so any base will do.
BASE_DB = 14
# A failure bound for a loaded machine (each inner worker migrates a test database first).
INNER_RUN_S = 840


def run_probe(tmp_path: Path, *xdist_args: str) -> list[dict]:
    out = tmp_path / "out"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(
        REDIS_URL=f"redis://127.0.0.1:6379/{BASE_DB}",
        CHANNEL_LAYER_PREFIX="probe",
        TICKERPROJ_VAR_DIR=str(tmp_path / "var"),
        TEST_DATABASE_NAME=f"test_probe_{uuid.uuid4().hex[:8]}",
        PROBE_OUT=str(out),
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *xdist_args,
         "tests/xdist_probe.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=INNER_RUN_S, check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    assert len(records) == 2
    for r in records:
        r["test_database"] = env["TEST_DATABASE_NAME"]
    return records


def ports_block(db: int) -> range:
    first = PORT_BLOCKS_START + db * PORT_BLOCK_SIZE
    return range(first, first + PORT_BLOCK_SIZE)


@pytest.mark.heavy
@pytest.mark.timeout(INNER_RUN_S + 60)
def test_each_xdist_worker_and_its_subprocesses_are_on_their_own_database_redis_prefix_var_and_ports(tmp_path):
    records = run_probe(tmp_path, "-n", "2", "--dist", "loadgroup")
    by_worker = {r["worker"]: r for r in records}
    assert sorted(by_worker) == ["gw0", "gw1"]
    for index, (worker, r) in enumerate(sorted(by_worker.items())):
        expected = {
            "database": f"{r['test_database']}_{worker}",
            "redis_url": f"redis://127.0.0.1:6379/{BASE_DB + index}",
            "prefix": f"probe_{worker}",
            "var_dir": str(tmp_path / "var" / "xdist" / worker),
        }
        assert {k: r[k] for k in expected} == expected
        assert r["subprocess"] == expected
        assert r["port"] in ports_block(BASE_DB + index)


@pytest.mark.heavy
@pytest.mark.timeout(INNER_RUN_S + 60)
def test_without_xdist_one_process_runs_on_the_configured_names(tmp_path):
    records = run_probe(tmp_path, "-p", "no:xdist")
    expected = {
        "worker": "",
        "database": records[0]["test_database"],
        "redis_url": f"redis://127.0.0.1:6379/{BASE_DB}",
        "prefix": "probe",
        "var_dir": str(tmp_path / "var"),
    }
    for r in records:
        assert {k: r[k] for k in expected} == expected
        assert r["subprocess"] == {k: expected[k] for k in ("database", "redis_url", "prefix", "var_dir")}
        assert r["port"] in ports_block(BASE_DB)


def test_a_worker_past_the_last_redis_database_is_a_clear_error():
    assert worker_redis_url("redis://127.0.0.1:6379/12", 3) == "redis://127.0.0.1:6379/15"
    assert worker_redis_url("redis://:pw@10.0.0.5:6380", 2) == "redis://:pw@10.0.0.5:6380/2"
    with pytest.raises(pytest.UsageError, match=r"would use Redis database 16 .*lower -n"):
        worker_redis_url("redis://127.0.0.1:6379/13", 3)
