"""The positions page: login required; in headless Chromium (Debian's ``chromium``) over real
daphne, the WebSocket ``positions`` push draws the accounts' positions, the totals per
underlying and the options whose Greeks are missing (no engine runs: a future counts delta 1
per unit, an option has no live snapshot)."""

from __future__ import annotations

import re
import uuid

import pytest
from django.contrib.auth import get_user_model
from playwright.sync_api import expect, sync_playwright

from accounts.models import KiteAccount
from accounts.order_services import trade_record
from tests.helpers import free_port
from tests.streaming.test_chain_page_browser import CHROMIUM, CHROMIUM_ARGS, WAIT_MS
from tests.streaming.wsutil import (
    NIFTY_FUT,
    create_universe,
    daphne_process,
    option_token,
    service_env,
)
from tests.streaming.wsutil import layer_prefix as layer_prefix

pytestmark = pytest.mark.django_db(transaction=True)
USERNAME, PASSWORD = "desk", "a-long-test-password"


def test_the_positions_page_requires_a_login(client):
    response = client.get("/accounts/positions/")
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]


@pytest.mark.heavy
def test_the_positions_page_draws_the_pushed_positions(layer_prefix, tmp_path):
    create_universe()
    user = get_user_model().objects.create_user(username=USERNAME, password=PASSWORD)
    paper = KiteAccount.objects.create(label="paper-desk", api_key="pp", is_paper=True)
    paper.traders.add(user)
    for token, symbol, side in ((NIFTY_FUT, "NIFTY30JANFUT", "SELL"),
                                (option_token(24000, "CE"), "NIFTY30JAN24000CE", "BUY")):
        trade_record(account=paper, source="paper", trade={
            "trade_id": uuid.uuid4().hex[:20], "order_id": uuid.uuid4().hex[:20], "exchange": "NFO",
            "tradingsymbol": symbol, "instrument_token": token, "product": "NRML",
            "transaction_type": side, "quantity": 75, "average_price": 100.0})
    port = free_port()
    web = daphne_process(port=port, env=service_env(layer_prefix=layer_prefix), log_dir=tmp_path)
    web.start(port=port)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{port}/accounts/positions/")
                page.fill("#id_username", USERNAME)
                page.fill("#id_password", PASSWORD)
                page.click("input[type=submit]")
                expect(page.locator("#conn-badge")).to_have_text("open", timeout=WAIT_MS)
                expect(page.locator("#accounts h2")).to_have_text("paper-desk (paper)", timeout=WAIT_MS)
                rows = page.locator("#accounts tbody tr")
                expect(rows).to_have_count(2, timeout=WAIT_MS)
                future = rows.filter(has_text="NIFTY30JANFUT")
                expect(future.locator("td").nth(6)).to_have_text("-75")  # delta ₹ of a short lot
                expect(rows.filter(has_text="NIFTY30JAN24000CE")).to_contain_text("no Greeks: no_snapshot")
                expect(page.locator("#missing li")).to_have_text(re.compile(r"^NIFTY30JAN24000CE .*no_snapshot$"))
                expect(page.locator("#totals tbody tr.incomplete").first).to_contain_text("NIFTY")
            finally:
                browser.close()
    finally:
        web.stop()
