"""The CI subset of the fault suite (`make faults-quick`): the whole deployment on private
PostgreSQL and Redis, the scenarios marked quick, exit 0 only if every promise held.

It runs as the suite runs (``python -m faults --quick`` in a subprocess, with none of the
test session's environment), so `make test` covers the harness and its quick scenarios.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The quick subset's budget is under 5 minutes; the bound is for a loaded machine.
BOUND_S = 540


@pytest.mark.timeout(BOUND_S + 60)
def test_the_quick_fault_scenarios_hold_every_promise(tmp_path):
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TZ")}
    log = tmp_path / "faults-quick.log"
    with log.open("wb") as out:
        result = subprocess.run([sys.executable, "-m", "faults", "--quick"], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, timeout=BOUND_S)
    output = log.read_text(errors="replace")
    assert result.returncode == 0, output[-6000:]
    lines = [line for line in output.splitlines() if line.startswith(("ok ", "FAIL "))]
    assert lines and all(line.startswith("ok ") for line in lines), output[-6000:]
    assert "scenarios held" in output
