"""``manage.py kitesim`` serves the simulator until SIGTERM and prints the URLs to use."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from kiteconnect import KiteConnect

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.timeout(120)  # readline blocks: the timeout bounds a command that never prints
def test_kitesim_command_serves_kite_and_stops_on_sigterm():
    process = subprocess.Popen(
        [
            sys.executable,
            "manage.py",
            "kitesim",
            "--port",
            "0",
            "--api-key",
            "cmdkey",
            "--access-token",
            "cmdtoken",
            "--account",
            "second:secret2:token2",
            "--seed",
            "4",
            "--tick-interval-ms",
            "100",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        printed = {}
        accounts = []
        for line in iter(process.stdout.readline, ""):
            name, _, value = line.strip().partition("=")
            if line.startswith("account "):
                accounts.append(line.split())
                if len(accounts) == 2:
                    break
            else:
                printed[name] = value
        assert printed["KITE_API_ROOT"].startswith("http://127.0.0.1:")
        assert printed["KITE_WS_URL"] == printed["KITE_API_ROOT"].replace("http", "ws") + "/ws"
        assert accounts[0] == ["account", "api_key=cmdkey", "access_token=cmdtoken"]
        assert accounts[1] == ["account", "api_key=second", "access_token=token2"]
        kite = KiteConnect("second", access_token="token2", root=printed["KITE_API_ROOT"])
        assert kite.ltp("NSE:NIFTY 50")["NSE:NIFTY 50"]["instrument_token"] == 256265
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert "kitesim.stopped" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)


def test_kitesim_command_rejects_a_malformed_account():
    result = subprocess.run(
        [sys.executable, "manage.py", "kitesim", "--port", "0", "--account", "nosecret"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "KEY:SECRET" in result.stderr
