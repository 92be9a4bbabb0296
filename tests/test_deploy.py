"""The deployment files: alert rules checked by promtool, and what the Procfile promises."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"


def promtool() -> str:
    """var/tools/promtool (`make install-promtool`, a dependency of `make test`) or one on PATH."""
    local = ROOT / "var" / "tools" / "promtool"
    found = str(local) if local.exists() else shutil.which("promtool")
    assert found, "promtool missing: run `make install-promtool` (Debian's prometheus package)"
    return found


def test_alert_rules_pass_promtool_check_and_their_unit_tests():
    check = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=120
    )
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run(
        [promtool(), "test", "rules", "alerts.test.yml"],
        cwd=RULES.parent, capture_output=True, text=True, timeout=120,
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr


def test_the_rules_cover_what_ops_must_hear_about():
    alerts = set(re.findall(r"^\s*- alert: (\w+)", RULES.read_text(), flags=re.M))
    assert {
        "TickerprojAccountNeedsLogin",
        "TickerprojStreamStalled",
        "TickerprojEngineDown",
        "TickerprojNoEngine",
        "TickerprojSubscriptionDrift",
        "TickerprojPublishFailures",
        "TickerprojCeleryJobFailed",
    } <= alerts
    tested = set(re.findall(r"alertname: (\w+)", (RULES.parent / "alerts.test.yml").read_text()))
    assert alerts == tested, "every rule has a unit test in alerts.test.yml"
