"""The chain page's analytics, charts, bars and REST-fallback flag, in headless Chromium.

Two set-ups on the test PostgreSQL and Redis, both with real daphne:

- the production layout in miniature (``runticker --mock`` + daphne, as
  test_chain_page_browser.py): the analytics header and the per-row columns fill in from the
  engine's ``analytics`` messages, and every chart draws and then redraws with new data; bars
  put on the ``bars.NIFTY`` group (as the engine's bar sink does) extend the candle chart,
  gap minutes included;
- daphne alone, with this test publishing the snapshots on the chain's group: a snapshot with
  ``rest_fallback: true`` shows the REST flag on its row (and the feed badge), one without the
  field or with ``false`` does not.

The charts are read through ECharts' own API (``echarts.getInstanceByDom(el).getOption()``),
so what is checked is what the library was given to draw, not a private copy.
"""

import asyncio
import datetime as dt
import re
import threading
import time
from typing import Any

import orjson
import pytest
from channels.layers import get_channel_layer
from django.contrib.auth import get_user_model
from playwright.sync_api import Page, expect, sync_playwright

from streaming import protocol, schema
from tests.helpers import free_port
from tests.streaming.test_chain_page_browser import (
    CHROMIUM,
    CHROMIUM_ARGS,
    PASSWORD,
    USERNAME,
    WAIT_MS,
)
from tests.streaming.test_chain_page_browser import stack as stack
from tests.streaming.wsutil import (
    EXPIRY,
    EXPIRY2,
    NIFTY_INDEX,
    create_universe,
    daphne_process,
    option_token,
    service_env,
    snapshot_item,
)
from tests.streaming.wsutil import layer_prefix as layer_prefix

PLOTS = ("chart-smile", "chart-oi", "chart-oi-change", "chart-term", "chart-series", "chart-candles")
SUMMARY_SHOWN = ("pcr_oi", "max_pain", "atm_strike", "atm_iv", "straddle", "forward",
                 "days_to_expiry", "lot_size")
# A fixed day of bars (Mon 6 Jan 2020, 10:00 IST): before the engine's own bars of today, so
# the two never share a day and the chart draws no gap minutes between them.
BARS_T0 = int(dt.datetime(2020, 1, 6, 4, 30, tzinfo=dt.UTC).timestamp() * 1000)


def log_in(page: Page, base: str) -> None:
    page.goto(base)
    page.fill("#id_username", USERNAME)
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    expect(page).to_have_url(base, timeout=WAIT_MS)
    expect(page.locator("#conn-badge")).to_have_text("live", timeout=WAIT_MS)
    expect(page.locator("#chain-body tr[data-strike]").first).to_be_attached(timeout=WAIT_MS)


def chart_series(page: Page, plot: str) -> list[list[Any]]:
    """The data of every series of a chart, as ECharts holds it."""
    return page.evaluate(
        "id => echarts.getInstanceByDom(document.getElementById(id)).getOption().series.map(s => s.data)",
        plot,
    )


def wait_for_redraw(page: Page, plot: str, *, changed: bool = True) -> None:
    """Wait until ``plot`` has been drawn again (with different data unless ``changed`` is false)."""
    before = page.evaluate(
        """id => ({draws: document.getElementById(id).dataset.draws,
                   data: JSON.stringify(echarts.getInstanceByDom(document.getElementById(id))
                                        .getOption().series.map(s => s.data))})""",
        plot,
    )
    page.wait_for_function(
        """([id, before, changed]) => {
             const el = document.getElementById(id);
             const data = JSON.stringify(echarts.getInstanceByDom(el).getOption().series.map(s => s.data));
             return el.dataset.draws !== before.draws && (!changed || data !== before.data);
           }""",
        arg=[plot, before, changed],
        timeout=WAIT_MS,
        polling=250,
    )


def group_send(group: str, message: dict[str, Any]) -> None:
    """Put one message on the real channel layer, from a thread of its own (Playwright's sync
    API owns an event loop in this one)."""

    async def send() -> None:
        layer = get_channel_layer()
        await layer.group_send(group, message)
        await layer.close_pools()

    errors: list[BaseException] = []
    thread = threading.Thread(target=lambda: _run(send, errors))
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def _run(coro_fn, errors: list[BaseException]) -> None:
    try:
        asyncio.run(coro_fn())
    except BaseException as exc:  # re-raised in the test's thread
        errors.append(exc)


def bar(start_ts: int, *, close: float | None, backfilled: bool = False) -> bytes:
    prices = (
        {"open": close - 2, "high": close + 3, "low": close - 4, "close": close}
        if close is not None
        else {"open": None, "high": None, "low": None, "close": None}
    )
    return orjson.dumps({
        "v": 1, "token": NIFTY_INDEX, "name": "NIFTY", "start_ts": start_ts, **prices,
        "volume": 0, "ticks": 0 if close is None else 40, "is_gap": close is None,
        "is_mock": True, "backfilled": backfilled,
    })


def minute_label(start_ts: int) -> str:
    """The candle chart's label of a minute: HH:MM in IST."""
    return time.strftime("%H:%M", time.gmtime(start_ts / 1000 + 5.5 * 3600))


def wait_for_candle(page: Page, start_ts: int) -> None:
    page.wait_for_function(
        """label => echarts.getInstanceByDom(document.getElementById("chart-candles"))
                      .getOption().xAxis[0].data.includes(label)""",
        arg=minute_label(start_ts), timeout=WAIT_MS,
    )


def candle_at(page: Page, start_ts: int) -> Any:
    """The candle chart's datum at the minute of ``start_ts`` ('-' for a gap), or None."""
    return page.evaluate(
        """label => {
             const o = echarts.getInstanceByDom(document.getElementById("chart-candles")).getOption();
             const i = o.xAxis[0].data.indexOf(label);
             return i < 0 ? null : {value: o.series[0].data[i]};
           }""",
        minute_label(start_ts),
    )


@pytest.mark.heavy
@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_chain_page_shows_the_analytics_and_draws_and_updates_every_chart(stack):
    base = f"http://127.0.0.1:{stack['port']}/"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            requested: list[str] = []
            page.on("request", lambda request: requested.append(request.url))
            log_in(page, base)
            # Everything, the charting library included, comes from this server: no CDN.
            assert any("/static/vendor/echarts/echarts.min.js" in url for url in requested), requested
            assert all(url.startswith((base, f"ws://127.0.0.1:{stack['port']}/", "data:")) for url in requested), requested

            # The analytics header: every value the mock market gives is shown, numbers only.
            for key in SUMMARY_SHOWN:
                expect(page.locator(f"#analytics dd[data-summary={key}]")).to_have_text(
                    re.compile(r"^[₹\d]"), timeout=WAIT_MS
                )
            expect(page.locator("#analytics dd[data-summary=forward]")).to_have_text(
                re.compile(r"^\d+\.\d{2} · (future|parity)"), timeout=WAIT_MS
            )
            atm_iv = page.text_content("#analytics dd[data-summary=atm_iv]")
            assert re.fullmatch(r"\d+\.\d{2} %", atm_iv), atm_iv
            # Per row: bid and ask with their quantities, and the OI change of the analytics.
            atm_row = page.locator("tr.atm")
            expect(atm_row.locator("td[data-side=ce][data-field=bid]")).to_have_text(
                re.compile(r"^\d+\.\d{2}[\d,]+$"), timeout=WAIT_MS
            )
            expect(atm_row.locator("td[data-side=pe][data-field=ask] small")).to_have_text(
                re.compile(r"^[\d,]+$"), timeout=WAIT_MS
            )
            expect(atm_row.locator("td[data-side=ce][data-field=oi_change]")).to_have_text(
                re.compile(r"^[+-]?[\d,]+$"), timeout=WAIT_MS
            )

            # Every chart but the candles draws from the chain and its analytics...
            for plot in PLOTS[:-1]:
                page.wait_for_function(
                    "id => +document.getElementById(id).dataset.points > 0", arg=plot, timeout=WAIT_MS
                )
            calls, puts = chart_series(page, "chart-smile")
            assert calls and puts and all(10_000 < k < 100_000 and 0 < iv < 200 for k, iv in calls + puts)
            shown_strikes = page.eval_on_selector_all(
                "#chain-body tr[data-strike]", "rows => rows.map(r => +r.dataset.strike)"
            )
            assert {k for k, _ in calls} <= set(shown_strikes)
            term = chart_series(page, "chart-term")[0]
            assert len(term) >= 2 and all(0 < p["value"] < 200 for p in term), term
            # ... and draws again when new data comes (the mock market moves every 250 ms).
            for plot in ("chart-smile", "chart-series", "chart-term"):
                wait_for_redraw(page, plot)
            # OI moves more slowly: the chart is drawn again and shows the table's numbers.
            wait_for_redraw(page, "chart-oi", changed=False)
            ce_oi = page.evaluate("""() => {
                const o = echarts.getInstanceByDom(document.getElementById("chart-oi")).getOption();
                return o.xAxis[0].data.map((k, i) => [+k, o.series[0].data[i]]);
            }""")
            assert [k for k, _ in ce_oi] == shown_strikes
            assert any(v for _, v in ce_oi), ce_oi

            # Bars: put on bars.NIFTY as the engine's bar sink does, the chart gains them; a
            # minute with no bar between two of the same day is drawn as a gap.
            group = schema.bars_group("NIFTY")
            group_send(group, schema.bar_closed_message(bar(BARS_T0, close=26000.0)))
            wait_for_candle(page, BARS_T0)
            assert candle_at(page, BARS_T0)["value"]["value"] == [25998.0, 26000.0, 25996.0, 26003.0]
            group_send(group, schema.bar_closed_message(bar(BARS_T0 + 3 * 60_000, close=26010.0, backfilled=True)))
            wait_for_candle(page, BARS_T0 + 3 * 60_000)
            assert candle_at(page, BARS_T0 + 60_000) == {"value": "-"}
            assert candle_at(page, BARS_T0 + 2 * 60_000) == {"value": "-"}
            late = candle_at(page, BARS_T0 + 3 * 60_000)["value"]
            assert late["value"] == [26008.0, 26010.0, 26006.0, 26013.0] and late["itemStyle"]["opacity"] < 1
            # A gap bar of the engine (no tick in that minute) is a gap too.
            group_send(group, schema.bar_closed_message(bar(BARS_T0 + 4 * 60_000, close=None)))
            wait_for_candle(page, BARS_T0 + 4 * 60_000)
            assert candle_at(page, BARS_T0 + 4 * 60_000) == {"value": "-"}
            shaded = page.evaluate("""() => echarts.getInstanceByDom(document.getElementById("chart-candles"))
                .getOption().series[0].markArea.data.map(a => [a[0].xAxis, a[1].xAxis])""")
            assert ["10:01", "10:02"] in shaded and ["10:04", "10:04"] in shaded, shaded
            # And the engine's own bars of today: the recent ones on subscribe, then each minute
            # as it closes (the mock market ticks the index all day).
            page.wait_for_function(
                """t0 => echarts.getInstanceByDom(document.getElementById("chart-candles"))
                       .getOption().series[0].data.length > 5""",
                arg=BARS_T0, timeout=WAIT_MS * 2,
            )
        finally:
            browser.close()


@pytest.fixture
def web_only(layer_prefix, tmp_path):
    """daphne on the test database with the small NIFTY universe and no engine: the snapshots
    are the test's."""
    get_user_model().objects.create_user(
        username=USERNAME, password=PASSWORD, is_staff=True, is_superuser=True
    )
    create_universe()
    port = free_port()
    web = daphne_process(port=port, env=service_env(layer_prefix=layer_prefix), log_dir=tmp_path)
    web.start(port=port)
    yield port
    web.stop()


def option_snapshot(strike: float, kind: str, **extra: Any) -> bytes:
    return snapshot_item(
        option_token(strike, kind), ltp=100.0, kind=kind, name="NIFTY", expiry=EXPIRY.isoformat(),
        strike=strike, iv=0.12, oi=150_000, bid=99.5, bid_qty=75, ask=100.5, ask_qty=150,
        flags=[], is_mock=False, **extra,
    )


@pytest.mark.heavy
@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_chain_page_flags_the_rows_whose_snapshot_came_from_the_rest_fallback(web_only):
    base = f"http://127.0.0.1:{web_only}/"
    group = schema.chain_group("NIFTY", EXPIRY)

    def publish(*items: bytes) -> None:
        tokens = [orjson.loads(i)["token"] for i in items]
        group_send(group, schema.snapshots_batch_message(group=group, tokens=tokens, items=list(items)))

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            log_in(page, base)
            row = page.locator('#chain-body tr[data-strike="24100"]')
            other = page.locator('#chain-body tr[data-strike="24150"]')
            publish(
                option_snapshot(24100, "CE", rest_fallback=True),
                option_snapshot(24100, "PE"),  # no rest_fallback field: false
                option_snapshot(24150, "CE", rest_fallback=False),
            )
            rest_ce = row.locator("td[data-side=ce][data-field=flags] .flag.rest")
            expect(rest_ce).to_have_text("REST", timeout=WAIT_MS)
            assert "quote API" in rest_ce.get_attribute("title")
            expect(row.locator("td[data-side=ce][data-field=bid]")).to_have_text("99.5075", timeout=WAIT_MS)
            expect(other.locator("td[data-side=ce][data-field=ltp]")).to_have_text("100.00", timeout=WAIT_MS)
            expect(row.locator("td[data-side=pe][data-field=ltp]")).to_have_text("100.00", timeout=WAIT_MS)
            assert row.locator("td[data-side=pe] .flag.rest").count() == 0
            assert other.locator(".flag.rest").count() == 0
            expect(page.locator("#feed-badge")).to_have_text("REST", timeout=WAIT_MS)
            # The snapshots draw the smile and the OI chart even before any analytics.
            page.wait_for_function(
                "() => +document.getElementById('chart-smile').dataset.points >= 3", timeout=WAIT_MS
            )
            calls, puts = chart_series(page, "chart-smile")
            assert calls == [[24100, 12], [24150, 12]] and puts == [[24100, 12]]

            # The stream is back: the same instrument without the flag.
            publish(option_snapshot(24100, "CE", rest_fallback=False))
            expect(rest_ce).to_have_count(0, timeout=WAIT_MS)
            expect(page.locator("#feed-badge")).to_have_text("LIVE", timeout=WAIT_MS)
        finally:
            browser.close()


def analytics_item(*, ts: int, iv_rank: float | None, oi_change: int) -> bytes:
    """An ``analytics`` message of the small universe's chain, checked against the protocol's model."""
    leg = {"ltp": 100.0, "bid": 99.5, "bid_qty": 75, "ask": 100.5, "ask_qty": 150, "volume": 1200, "oi": 150_000}
    item = protocol.analytics_message(
        underlying="NIFTY", expiry=EXPIRY, ts_ms=ts,
        summary={
            "pcr_oi": 0.8731, "pcr_volume": 1.0412, "max_pain": 24000.0, "atm_strike": 24100.0,
            "atm_iv": 0.1243, "straddle": 412.5, "forward": 24105.35, "forward_source": "future",
            "forward_stale": False, "days_to_expiry": 24.87, "lot_size": 75,
            "oi_change_since": ts - 3_600_000, "iv_rank": iv_rank,
            "iv_percentile": None if iv_rank is None else 37.5, "iv_window_days": 365, "is_mock": False,
        },
        rows=[{
            "strike": 24100.0,
            "ce": {"token": option_token(24100, "CE"), **leg, "oi_change": oi_change, "buildup": "long_buildup"},
            "pe": {"token": option_token(24100, "PE"), **leg, "oi_change": -30150, "buildup": "long_unwinding"},
        }, {"strike": 24150.0, "ce": None, "pe": None}],
        term_structure=[
            {"expiry": EXPIRY.isoformat(), "atm_iv": 0.1243, "days_to_expiry": 24.87, "forward": 24105.35},
            {"expiry": EXPIRY2.isoformat(), "atm_iv": 0.1302, "days_to_expiry": 52.87, "forward": 24190.0},
        ],
    )
    protocol.AnalyticsMessage.model_validate_json(item)
    return item


@pytest.mark.heavy
@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_chain_page_shows_an_analytics_message_in_the_header_the_rows_and_the_charts(web_only):
    base = f"http://127.0.0.1:{web_only}/"
    group = schema.chain_group("NIFTY", EXPIRY)
    ts = int(dt.datetime(2026, 1, 5, 5, 0, tzinfo=dt.UTC).timestamp() * 1000)  # 10:30 IST

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            log_in(page, base)
            summary = page.locator("#analytics")
            group_send(group, schema.chain_analytics_message(
                group=group, item=analytics_item(ts=ts, iv_rank=None, oi_change=91200)))
            expect(summary.locator("dd[data-summary=max_pain]")).to_have_text("24,000", timeout=WAIT_MS)
            shown = {
                key: page.text_content(f"#analytics dd[data-summary={key}]")
                for key in ("pcr_oi", "pcr_volume", "atm_strike", "atm_iv", "straddle", "forward",
                            "days_to_expiry", "lot_size", "oi_change_since")
            }
            assert shown == {
                "pcr_oi": "0.87", "pcr_volume": "1.04", "atm_strike": "24,100", "atm_iv": "12.43 %",
                "straddle": "₹412.50", "forward": "24105.35 · future", "days_to_expiry": "24.9",
                "lot_size": "75", "oi_change_since": "09:30 IST",
            }
            # IV rank and percentile only once there is history to rank against.
            history = summary.locator(".history")
            expect(history).to_have_count(2)
            expect(history.first).to_be_hidden()
            expect(history.last).to_be_hidden()

            row = page.locator('#chain-body tr[data-strike="24100"]')
            expect(row.locator("td[data-side=ce][data-field=oi_change]")).to_have_text("+91,200", timeout=WAIT_MS)
            assert "up" in row.locator("td[data-side=ce][data-field=oi_change]").get_attribute("class")
            assert row.locator("td[data-side=pe][data-field=oi_change]").text_content() == "-30,150"
            buildup = row.locator("td[data-side=ce][data-field=buildup] .flag")
            assert (buildup.text_content(), buildup.get_attribute("title")) == (
                "long BU", "long build-up: price up, OI up")
            assert row.locator("td[data-side=pe][data-field=buildup]").text_content() == "long unw."
            page.wait_for_function(
                "() => +document.getElementById('chart-term').dataset.points === 2", timeout=WAIT_MS
            )
            assert [p["value"] for p in chart_series(page, "chart-term")[0]] == [12.43, 13.02]
            assert chart_series(page, "chart-series") == [[[ts, 12.43]], [[ts, 412.5]], [[ts, 0.873]]]

            # The next message: the history appears, OI change moves, the series grows a minute.
            group_send(group, schema.chain_analytics_message(
                group=group, item=analytics_item(ts=ts + 60_000, iv_rank=41.2, oi_change=-4500)))
            expect(row.locator("td[data-side=ce][data-field=oi_change]")).to_have_text("-4,500", timeout=WAIT_MS)
            expect(summary.locator("dd[data-summary=iv_rank]")).to_have_text("41.2", timeout=WAIT_MS)
            expect(summary.locator("dd[data-summary=iv_percentile]")).to_have_text("37.5", timeout=WAIT_MS)
            expect(history.first).to_be_visible()
            expect(history.last).to_be_visible()
            page.wait_for_function(
                "() => +document.getElementById('chart-series').dataset.points === 6", timeout=WAIT_MS
            )
            oi_change = page.evaluate("""() => {
                const o = echarts.getInstanceByDom(document.getElementById("chart-oi-change")).getOption();
                const i = o.xAxis[0].data.indexOf("24100");
                return [o.series[0].data[i], o.series[1].data[i]];
            }""")
            assert oi_change == [-4500, -30150]
        finally:
            browser.close()
