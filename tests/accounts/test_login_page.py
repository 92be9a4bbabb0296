"""The traders' login page at /accounts/login/: a non-staff user logs in through the form.

The browser test runs daphne as its own process on the test database and drives Debian's
chromium; the chain page's own browser test covers the streaming after login.
"""

import re

import pytest
from django.contrib.auth import get_user_model
from playwright.sync_api import expect, sync_playwright

from tests.helpers import free_port
from tests.streaming.test_chain_page_browser import CHROMIUM, CHROMIUM_ARGS, WAIT_MS
from tests.streaming.wsutil import daphne_process, service_env
from tests.streaming.wsutil import layer_prefix as layer_prefix

USERNAME, PASSWORD = "desk-trader", "a-long-trader-password"


def test_the_login_url_is_the_traders_page_not_the_admins(client, db):
    response = client.get("/")
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/?next=/")
    page = client.get("/accounts/login/")
    assert page.status_code == 200 and b'name="username"' in page.content


def test_a_non_staff_user_logs_in_with_the_form(client, db):
    get_user_model().objects.create_user(username=USERNAME, password=PASSWORD)
    response = client.post("/accounts/login/", {"username": USERNAME, "password": PASSWORD, "next": "/"})
    assert response.status_code == 302 and response["Location"] == "/"
    assert client.get("/").status_code == 200


def test_a_wrong_password_or_inactive_user_stays_on_the_form(client, db):
    get_user_model().objects.create_user(username=USERNAME, password=PASSWORD, is_active=False)
    response = client.post("/accounts/login/", {"username": USERNAME, "password": PASSWORD})
    assert response.status_code == 200 and b"Wrong username or password" in response.content


@pytest.fixture
def web(layer_prefix, tmp_path):
    get_user_model().objects.create_user(username=USERNAME, password=PASSWORD)
    port = free_port()
    process = daphne_process(port=port, env=service_env(layer_prefix=layer_prefix), log_dir=tmp_path)
    process.start(port=port)
    yield f"http://127.0.0.1:{port}/"
    process.stop()


@pytest.mark.heavy
@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_a_non_staff_trader_logs_in_through_the_browser_and_out_again(web):
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(web)
            expect(page).to_have_url(re.compile(r"/accounts/login/\?next=/$"), timeout=WAIT_MS)
            page.fill("#id_username", USERNAME)
            page.fill("#id_password", "not-the-password")
            page.click("input[type=submit]")
            expect(page.locator(".error")).to_contain_text("Wrong username or password")
            page.fill("#id_username", USERNAME)
            page.fill("#id_password", PASSWORD)
            page.click("input[type=submit]")
            expect(page).to_have_url(web, timeout=WAIT_MS)
            expect(page.locator("nav.user")).to_contain_text(USERNAME)
            expect(page.locator("nav.user")).not_to_contain_text("admin")
            page.click("nav.user button[type=submit]")
            expect(page).to_have_url(re.compile(r"/accounts/login/$"), timeout=WAIT_MS)
        finally:
            browser.close()
