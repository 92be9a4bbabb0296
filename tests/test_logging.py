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


SCRUB_SCRIPT = """
import logging, sys
import structlog
from tickerproj.logging import configure_logging, remember_secret
configure_logging(json=sys.argv[1] == "json", level="INFO")
remember_secret("KnownSecretValue0123456789")
log = structlog.get_logger("probe")
try:
    raise ValueError("wss://ws.kite.trade?api_key=k1&access_token=UnknownTok987654321 rejected")
except ValueError:
    log.exception("probe.failed", detail="token KnownSecretValue0123456789 was used")
try:
    raise RuntimeError("header Authorization: token k1:AnotherUnknown55555 and KnownSecretValue0123456789")
except RuntimeError:
    logging.getLogger("stdlib.probe").exception("stdlib said %s", "KnownSecretValue0123456789")
"""


def test_every_rendered_line_and_traceback_is_scrubbed_of_secret_values():
    for mode in ("json", "console"):
        result = subprocess.run(
            [sys.executable, "-c", SCRUB_SCRIPT, mode], cwd=ROOT, capture_output=True, text=True,
            check=True,
        )
        out = result.stderr
        assert "probe.failed" in out and "Traceback" in out and "stdlib said" in out, out
        for secret in ("KnownSecretValue0123456789", "UnknownTok987654321", "AnotherUnknown55555"):
            assert secret not in out, (mode, secret)
        assert "[scrubbed]" in out


def test_scrubbing_is_bounded_and_strangers_keys_cannot_evict_kite_secrets():
    from tickerproj.logging import SecretScrubber

    scrubber = SecretScrubber(max_held=10, max_presented=3)
    scrubber.remember("KiteAccessToken0000")
    for i in range(5):
        scrubber.remember(f"apikey-number-{i:04d}", presented=True)
    scrubber.remember("odd key with spaces", presented=True)  # not a key's shape: not kept
    scrubber.remember("short")  # under 8 characters: not a secret worth garbling text for
    line = "KiteAccessToken0000 apikey-number-0000 apikey-number-0004 short NIFTY25NOV24000CE"
    # The two oldest presented keys were evicted; the Kite token was not.
    assert scrubber.scrub(line) == "[scrubbed] apikey-number-0000 [scrubbed] short NIFTY25NOV24000CE"
    assert scrubber.scrub("odd key with spaces") == "odd key with spaces"
