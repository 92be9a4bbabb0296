"""Logs are structlog events with context as fields; secrets never reach the output."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = """
import structlog
from tickerproj.logging import configure_logging
configure_logging(json=True, level="INFO")
log = structlog.get_logger("probe")
log.info("kite.reconnect", account="acc1", instrument_token=256265, attempt=3)
log.warning("account.login", account="acc1", access_token="tok-secret", api_secret="sec-secret")
"""


def test_json_events_carry_context_as_fields_and_redact_secrets():
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, check=True)
    events = [json.loads(line) for line in result.stderr.strip().splitlines()]
    assert events[0]["event"] == "kite.reconnect"
    assert events[0]["account"] == "acc1" and events[0]["instrument_token"] == 256265
    assert events[0]["level"] == "info" and "timestamp" in events[0]
    assert "tok-secret" not in result.stderr and "sec-secret" not in result.stderr
    assert events[1]["access_token"] == "[redacted]"
