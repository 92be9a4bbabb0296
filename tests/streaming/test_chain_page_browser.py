"""The option-chain page end to end, in headless Chromium (Debian's ``chromium``, no download).

The production layout in miniature, on the test PostgreSQL and Redis: ``daphne`` serving
tickerproj.asgi and ``manage.py runticker --mock`` streaming the synthetic market through the
real pipeline, each its own process. The browser logs in through the admin form, opens the
chain, sees Greeks arrive and change, and sees the connection badge go to "reconnecting" when
daphne restarts and back to "live" once it is up again.
"""

import json
import re
import sys

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from playwright.sync_api import Page, expect, sync_playwright

from streaming.engine.market_hours import parse_holidays
from streaming.management.commands.demo import demo_universe_load
from streaming.market import SyntheticMarket
from tests.streaming.wsutil import (
    ServiceProcess,
    daphne_process,
    free_port,
    service_env,
)
from tests.streaming.wsutil import layer_prefix as layer_prefix

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
USERNAME, PASSWORD = "ops", "a-long-test-password"
GREEK_CELLS = ",".join(f"td[data-field={f}]" for f in ("iv", "delta", "gamma", "theta", "vega"))
WAIT_MS = 60_000


@pytest.fixture
def stack(layer_prefix, tmp_path):
    """runticker --mock and daphne on the test database, with the mock market's universe."""
    get_user_model().objects.create_user(
        username=USERNAME, password=PASSWORD, is_staff=True, is_superuser=True
    )
    # The same market runticker builds for mock mode (seed, rate, holidays from settings).
    market = SyntheticMarket(
        seed=settings.MOCK_MARKET_SEED,
        r=settings.RISK_FREE_RATE,
        holidays=parse_holidays(settings.MARKET_HOLIDAYS),
    )
    demo_universe_load(market=market)
    env = service_env(layer_prefix=layer_prefix)
    port = free_port()
    engine = ServiceProcess(
        "runticker", [sys.executable, "manage.py", "runticker", "--mock"], env, tmp_path
    ).start()
    web = daphne_process(port=port, env=env, log_dir=tmp_path).start(port=port)
    yield {"port": port, "web": web, "engine": engine}
    web.stop()
    engine.stop()


def greek_texts(page: Page) -> str:
    return page.eval_on_selector_all(GREEK_CELLS, "tds => JSON.stringify(tds.map(t => t.textContent))")


def wait_for_greeks_to_change(page: Page) -> None:
    before = greek_texts(page)
    page.wait_for_function(
        """([selector, before]) => JSON.stringify(
             [...document.querySelectorAll(selector)].map(t => t.textContent)) !== before""",
        arg=[GREEK_CELLS, before],
        timeout=WAIT_MS,
    )


def test_chain_page_logs_in_streams_greeks_and_recovers_from_a_server_restart(stack):
    base = f"http://127.0.0.1:{stack['port']}/"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 900})
            page.goto(base)
            expect(page).to_have_url(re.compile(r"/admin/login/\?next=/$"))
            page.fill("#id_username", USERNAME)
            page.fill("#id_password", PASSWORD)
            page.click("input[type=submit]")
            expect(page).to_have_url(base)
            expect(page.locator("select[name=underlying]")).to_have_value("NIFTY")

            conn = page.locator("#conn-badge")
            expect(conn).to_have_text("live", timeout=WAIT_MS)
            expect(page.locator("#feed-badge")).to_have_text("MOCK", timeout=WAIT_MS)
            # Calls and puts side by side: 31 strikes (15 each side of the money).
            expect(page.locator("#chain-body tr[data-strike]")).to_have_count(31)
            atm_delta = page.locator("tr.atm td[data-side=ce][data-field=delta]")
            expect(atm_delta).to_have_text(re.compile(r"^0\.\d{3}$"), timeout=WAIT_MS)
            expect(page.locator("tr.atm td[data-side=pe][data-field=delta]")).to_have_text(
                re.compile(r"^-0\.\d{3}$")
            )
            expect(page.locator("#forward")).to_have_text(re.compile(r"^\d+\.\d{2}$"))
            # The highlighted row is the strike nearest the forward shown.
            forward = float(page.text_content("#forward"))
            strikes = [float(s) for s in page.eval_on_selector_all(
                "#chain-body tr[data-strike]", "rows => rows.map(r => r.dataset.strike)")]
            nearest = min(strikes, key=lambda k: abs(k - forward))
            assert float(page.get_attribute("tr.atm", "data-strike")) == nearest
            # Flags are readable badges, not snake_case names.
            flags = page.locator("td.flags .flag")
            expect(flags.first).to_be_visible(timeout=WAIT_MS)
            labels = set(flags.all_text_contents())
            assert labels and not any("_" in label for label in labels), labels
            wait_for_greeks_to_change(page)

            # daphne goes away and comes back on the same port.
            stack["web"].stop()
            expect(conn).to_have_text("reconnecting", timeout=WAIT_MS)
            stack["web"].start(port=stack["port"])
            expect(conn).to_have_text("live", timeout=WAIT_MS)
            wait_for_greeks_to_change(page)
            expect(page.locator("#feed-badge")).to_have_text("MOCK")
            assert json.loads(greek_texts(page))
        finally:
            browser.close()
