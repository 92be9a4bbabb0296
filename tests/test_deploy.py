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


def _names_read_by_settings() -> set[str]:
    text = (ROOT / "tickerproj" / "settings.py").read_text()
    return set(re.findall(r"""[eE]nv(?:\(\))?\.\w+\(\s*["']([A-Z][A-Z0-9_]+)["']""", text))


def test_env_example_lists_every_setting_and_every_procfile_variable():
    example = (ROOT / ".env.example").read_text()
    listed = set(re.findall(r"^([A-Z][A-Z0-9_]+)=", example, flags=re.M))
    settings_names = _names_read_by_settings() - {"TEST_DATABASE_NAME"}  # the test suite's own
    assert len(settings_names) > 40
    assert settings_names - listed == set()
    procfile_names = set(re.findall(r"\$\{([A-Z][A-Z0-9_]+):-", (ROOT / "Procfile").read_text()))
    assert procfile_names - listed == set()
    assert listed - settings_names - procfile_names == set(), "listed but read by nothing"


def test_systemd_units_verify(tmp_path):
    """systemd-analyze verify on the units, installed at this checkout instead of /opt/tickerproj."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze (Debian's systemd package) is needed to check the units"
    units = ROOT / "deploy" / "systemd"
    names = []
    for unit in units.iterdir():
        text = unit.read_text().replace("/opt/tickerproj", str(ROOT))
        name = unit.name.replace("@.", "@9999.")
        (tmp_path / name).write_text(text)
        (tmp_path / unit.name).write_text(text)
        names.append(name)
    result = subprocess.run(
        [analyze, "verify", "--man=no", *(str(tmp_path / n) for n in sorted(names))],
        capture_output=True, text=True, timeout=120, env={"SYSTEMD_LOG_LEVEL": "warning", "PATH": "/usr/bin:/bin"},
    )
    problems = [
        line for line in (result.stdout + result.stderr).splitlines()
        # The target names concrete instances (8001...) that exist only once installed.
        if line.strip() and "tickerproj.target" not in line
    ]
    assert problems == []
    beat = (units / "tickerproj-beat.service").read_text()
    assert "EXACTLY ONE" in beat and not (units / "tickerproj-beat@.service").exists()


def test_the_nginx_site_proxies_http_websockets_and_serves_static():
    site = (ROOT / "deploy" / "nginx" / "tickerproj.conf").read_text()
    assert re.findall(r"server 127\.0\.0\.1:(\d+);", site) == ["8001", "8002"]
    websocket = site[site.index("location /ws/"):]
    for line in ("proxy_set_header Upgrade $http_upgrade;",
                 "proxy_set_header Connection $connection_upgrade;", "proxy_http_version 1.1;"):
        assert line in websocket
    assert "alias /var/lib/tickerproj/static/;" in site
    # daphne --proxy-headers trusts X-Forwarded-For: nginx must overwrite it, never append.
    assert "$proxy_add_x_forwarded_for" not in site
    assert site.count("proxy_set_header X-Forwarded-For $remote_addr;") == 3
