"""H2 (docs/security.md): runticker given a Kite URL websockets refuses logs no secret.

A real runticker subprocess gets ``KITE_WS_URL=https://...``: websockets' InvalidURI quotes the
whole URL, which used to carry the access token into the supervisor's traceback. Every byte
the process writes is searched for the account's access token and API secret.
"""

import uuid

import pytest

from accounts.services import account_set_session
from streaming.market import SyntheticMarket
from subscriptions.models import Instrument
from tests.streaming.engine.runtime_helpers import (
    ManagePy,
    instruments_from_market,
    subprocess_env,
    subscribe,
    wait_until,
)

pytestmark = pytest.mark.django_db(transaction=True)

ACCESS_TOKEN = "tokLEAKCHECK" + uuid.uuid4().hex
API_SECRET = "secLEAKCHECK" + uuid.uuid4().hex


def test_a_bad_kite_url_never_puts_the_token_in_the_logs(tmp_path):
    from accounts.models import KiteAccount

    instruments_from_market(SyntheticMarket(seed=0))
    subscribe(Instrument.objects.filter(name="NIFTY").values_list("instrument_token", flat=True)[:20])
    account = KiteAccount.objects.create(label="acc1", api_key="k1", api_secret=API_SECRET)
    account_set_session(account=account, access_token=ACCESS_TOKEN)
    env = subprocess_env(
        KITE_WS_URL="https://ws.example.invalid",
        KITE_API_ROOT="http://127.0.0.1:9",
        CHANNEL_LAYER_PREFIX=f"sec{uuid.uuid4().hex[:8]}",
        LOG_LEVEL="DEBUG",
    )
    engine = ManagePy(["runticker", "--no-mock"], env=env, log_path=tmp_path / "runticker.log")
    try:
        # The engine has tried the URL and its supervisor has reported the failure.
        wait_until(
            lambda: "engine.task_crashed" in engine.output() or not engine.alive(),
            timeout_s=90,
            what="runticker reporting the bad Kite URL",
        )
        assert engine.alive(), engine.output()[-3000:]
    finally:
        engine.terminate(timeout_s=30)
    output = (tmp_path / "runticker.log").read_bytes()
    assert b"https://ws.example.invalid" in output, "the failure names the URL without the token"
    assert ACCESS_TOKEN.encode() not in output
    assert API_SECRET.encode() not in output
