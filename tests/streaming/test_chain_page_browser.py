"""The option-chain page: its view (pickers, login), and end to end, in headless Chromium (Debian's ``chromium``, no download).

The production layout in miniature, on the test PostgreSQL and Redis: ``daphne`` serving
tickerproj.asgi and ``manage.py runticker --mock`` streaming the synthetic market through the
real pipeline, each its own process. The browser logs in through the login form, opens the
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

from streaming.management.commands.demo import demo_universe_load
from streaming.market import SyntheticMarket
from streaming.nse_calendar import parse_holidays
from subscriptions.models import Instrument
from tests.helpers import free_port
from tests.streaming.wsutil import (
    EXPIRY,
    EXPIRY2,
    ServiceProcess,
    create_universe,
    daphne_process,
    service_env,
)
from tests.streaming.wsutil import layer_prefix as layer_prefix

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


def listed_strikes(underlying: str) -> dict[str, list[float]]:
    """The listed strikes of each expiry of ``underlying``, by ISO date (read before Playwright
    runs: its event loop makes Django refuse synchronous queries)."""
    out: dict[str, set[float]] = {}
    for expiry, strike in Instrument.objects.filter(
        name=underlying, instrument_type="CE"
    ).values_list("expiry", "strike"):
        out.setdefault(expiry.isoformat(), set()).add(strike)
    return {expiry: sorted(strikes) for expiry, strikes in out.items()}


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


@pytest.mark.heavy
@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_chain_page_logs_in_streams_greeks_and_recovers_from_a_server_restart(stack):
    base = f"http://127.0.0.1:{stack['port']}/"
    nifty_strikes = listed_strikes("NIFTY")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 900})
            page.goto(base)
            expect(page).to_have_url(re.compile(r"/accounts/login/\?next=/$"), timeout=WAIT_MS)
            page.fill("#id_username", USERNAME)
            page.fill("#id_password", PASSWORD)
            page.click("input[type=submit]")
            expect(page).to_have_url(base, timeout=WAIT_MS)
            expect(page.locator("select[name=underlying]")).to_have_value("NIFTY", timeout=WAIT_MS)

            conn = page.locator("#conn-badge")
            expect(conn).to_have_text("live", timeout=WAIT_MS)
            expect(page.locator("#feed-badge")).to_have_text("MOCK", timeout=WAIT_MS)
            # Calls and puts side by side: 15 strikes each side of the money, as far as the listed
            # strikes reach (the mock market walks away from the strike it was listed around).
            rows = page.locator("#chain-body tr[data-strike]")
            expect(rows.first).to_be_attached(timeout=WAIT_MS)
            shown_strikes = [float(k) for k in page.eval_on_selector_all(
                "#chain-body tr[data-strike]", "rows => rows.map(r => r.dataset.strike)")]
            listed = nifty_strikes[page.input_value("select[name=expiry]")]
            first = listed.index(shown_strikes[0])
            assert shown_strikes == listed[first : first + len(shown_strikes)], shown_strikes
            assert 16 <= len(shown_strikes) <= 31, shown_strikes
            atm_delta = page.locator("tr.atm td[data-side=ce][data-field=delta]")
            expect(atm_delta).to_have_text(re.compile(r"^0\.\d{3}$"), timeout=WAIT_MS)
            expect(page.locator("tr.atm td[data-side=pe][data-field=delta]")).to_have_text(
                re.compile(r"^-0\.\d{3}$"), timeout=WAIT_MS
            )
            expect(page.locator("#forward")).to_have_text(
                re.compile(r"^\d+\.\d{2}$"), timeout=WAIT_MS
            )
            # The highlighted row is the strike nearest the forward shown, read in one go: the
            # mock market moves the forward between two separate reads.
            shown = page.evaluate("""() => ({
                forward: document.querySelector("#forward").textContent,
                strikes: [...document.querySelectorAll("#chain-body tr[data-strike]")]
                    .map(r => r.dataset.strike),
                atm: document.querySelector("tr.atm").dataset.strike,
            })""")
            forward = float(shown["forward"])
            nearest = min((float(k) for k in shown["strikes"]), key=lambda k: abs(k - forward))
            assert float(shown["atm"]) == nearest, shown
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
            expect(page.locator("#feed-badge")).to_have_text("MOCK", timeout=WAIT_MS)
            assert json.loads(greek_texts(page))
        finally:
            browser.close()


# --- the view itself (no browser) ----------------------------------------------------------------


@pytest.fixture
def logged_in(client):
    user = get_user_model().objects.create_user(username="t", password="pw")
    client.force_login(user)
    return client


def _config(response) -> dict:
    html = response.content.decode()
    return json.loads(
        re.search(r'<script id="chain-config" type="application/json">(.*?)</script>', html, re.S).group(1)
    )


@pytest.mark.django_db
def test_chain_page_requires_a_login(client):
    response = client.get("/")
    assert response.status_code == 302
    assert response["Location"] == "/accounts/login/?next=/"


@pytest.mark.django_db
def test_chain_page_pickers_default_to_nifty_and_its_nearest_expiry(logged_in):
    create_universe()
    response = logged_in.get("/")
    assert response.status_code == 200
    config = _config(response)
    assert config["underlying"] == "NIFTY" and config["expiry"] == EXPIRY.isoformat()
    assert config["strikesAroundAtm"] == 15 and config["wsPath"] == "/ws/v1/"
    assert config["flags"]["below_intrinsic"] == {
        "label": "below intrinsic",
        "failure": True,
        "hint": "premium at or below intrinsic value: no volatility fits",
    }
    assert config["flags"]["pair_iv"]["failure"] is False
    assert config["loginUrl"] == "/accounts/login/?next=%2F"
    html = response.content.decode()
    assert f'<option value="{EXPIRY2.isoformat()}">' in html
    assert 'id="conn-badge"' in html and 'id="feed-badge"' in html


@pytest.mark.django_db
def test_chain_page_takes_the_choice_from_the_query_and_ignores_nonsense(logged_in):
    create_universe()
    config = _config(logged_in.get("/", {"expiry": EXPIRY2.isoformat(), "strikes": "30"}))
    assert (config["expiry"], config["strikesAroundAtm"]) == (EXPIRY2.isoformat(), 30)
    config = _config(logged_in.get("/", {"underlying": "NOPE", "expiry": "2031-99-01", "strikes": "x"}))
    assert (config["underlying"], config["expiry"], config["strikesAroundAtm"]) == (
        "NIFTY", EXPIRY.isoformat(), 15
    )
    assert _config(logged_in.get("/", {"strikes": "7"}))["strikesAroundAtm"] == 15


@pytest.mark.django_db
def test_chain_page_without_instruments_says_what_to_do(logged_in):
    response = logged_in.get("/")
    assert response.status_code == 200
    assert "No option instruments are loaded yet" in response.content.decode()
    assert _config(response)["underlying"] == ""
