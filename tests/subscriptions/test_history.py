"""GET /api/v1/history/<token>: candles (with Greeks for options) from the simulator, stored and served again."""

from __future__ import annotations

import datetime as dt
import threading
from contextlib import ExitStack

import numpy as np
import orjson
import pytest
from django.utils import timezone

from accounts.services import apitoken_create
from streaming.greeks import (
    IST,
    Flag,
    compute_greeks,
    compute_greeks_spot,
    expiry_close_epoch_s,
    flag_names,
    years_to_expiry,
)
from streaming.kite.rest import KiteRateLimiter, KiteRestClient
from subscriptions.history import history_get, history_missing_start
from subscriptions.models import CandleGreeks, HistoryCoverage, Instrument
from tests.subscriptions.conftest import SIM_ACCESS_TOKEN, SIM_API_KEY

pytestmark = pytest.mark.django_db

R = 0.065


@pytest.fixture
def staff_client(client, django_user_model):
    user = django_user_model.objects.create_user("ops", password="pw", is_staff=True)
    client.force_login(user)
    return client


@pytest.fixture
def history_env(kite_settings, sim_instruments, sim_account, redis_client):
    kite_settings.RISK_FREE_RATE = R
    kite_settings.DIVIDEND_YIELD = 0.012
    return kite_settings


def nifty_option(*, with_future: bool, kind: str = "CE", offset_steps: int = 0) -> Instrument:
    """An option of the nearest NIFTY expiry that has (or has not) a future of its own."""
    futures = set(
        Instrument.objects.filter(name="NIFTY", instrument_type="FUT").values_list("expiry", flat=True)
    )
    expiries = (
        Instrument.objects.filter(name="NIFTY", instrument_type=kind, expiry__gte=timezone.localdate())
        .order_by("expiry").values_list("expiry", flat=True).distinct()
    )
    expiry = next(e for e in expiries if (e in futures) == with_future)
    return Instrument.objects.get(
        name="NIFTY", instrument_type=kind, expiry=expiry, strike=26_000.0 + 50.0 * offset_steps
    )


def last_sessions(days: int) -> tuple[dt.datetime, dt.datetime]:
    end = timezone.now().astimezone(IST).replace(microsecond=0)
    return end - dt.timedelta(days=days), end


def get_history(client, token: int, start: dt.datetime, end: dt.datetime, interval="minute", **headers):
    return client.get(
        f"/api/v1/history/{token}",
        {"from": start.isoformat(), "to": end.isoformat(), "interval": interval},
        **headers,
    )


def sim_client(sim) -> KiteRestClient:
    return KiteRestClient(
        api_key=SIM_API_KEY, access_token=SIM_ACCESS_TOKEN, api_root=sim.http_url,
        rate_limiter=KiteRateLimiter.from_redis_url(""),
    )


def column(candles, name):
    return np.array([np.nan if c[name] is None else c[name] for c in candles], dtype=np.float64)


def test_greeks_match_the_greeks_engine_on_the_same_candles(staff_client, history_env, sim):
    option = nifty_option(with_future=True)
    future = Instrument.objects.get(name="NIFTY", instrument_type="FUT", expiry=option.expiry)
    start, end = last_sessions(10)

    response = get_history(staff_client, option.pk, start, end)
    assert response.status_code == 200, response.content
    body = orjson.loads(response.content)
    assert body["source"] == "computed"
    assert body["underlying"] == {"instrument_token": future.pk, "tradingsymbol": future.tradingsymbol,
                                  "kind": "future"}
    candles = body["candles"]
    assert len(candles) > 1000

    # The same inputs, fetched independently, through the Greeks engine directly.
    with sim_client(sim) as kite:
        opt = kite.historical(option.pk, start, end, "minute", oi=True)
        fut = kite.historical(future.pk, start, end, "minute")
    opt_s = opt.ts.astype("datetime64[s]").astype(np.int64)
    fut_s = fut.ts.astype("datetime64[s]").astype(np.int64)
    assert np.array_equal(opt_s, fut_s)  # the simulator prices both every minute
    expected = compute_greeks(
        price=opt.close,
        forward=fut.close,
        strike=option.strike,
        t_years=years_to_expiry(now_epoch_s=opt_s + 60.0, expiry_epoch_s=expiry_close_epoch_s(option.expiry)),
        is_call=True,
        r=R,
    )
    assert [dt.datetime.fromisoformat(c["ts"]).timestamp() for c in candles] == opt_s.tolist()
    np.testing.assert_array_equal(column(candles, "close"), opt.close)
    np.testing.assert_array_equal(column(candles, "forward"), fut.close)
    np.testing.assert_array_equal(column(candles, "oi"), opt.oi)
    for name in ("iv", "delta", "gamma", "theta", "vega", "rho"):
        np.testing.assert_allclose(column(candles, name), getattr(expected, name), rtol=1e-12, equal_nan=True)
    assert [c["flags"] for c in candles] == [flag_names(f) for f in expected.flags.tolist()]
    # The simulator priced these options at about NIFTY's 12 % volatility surface.
    iv = column(candles, "iv")
    assert 0.08 < np.nanmedian(iv) < 0.2
    assert np.isfinite(iv).mean() > 0.9


def test_a_second_request_is_served_from_postgresql_without_calling_kite(staff_client, history_env, sim):
    option = nifty_option(with_future=True, kind="PE", offset_steps=-2)
    start, end = last_sessions(5)
    first = orjson.loads(get_history(staff_client, option.pk, start, end).content)
    calls = sim.sim.rest_requests.get("market.historical", 0)
    assert calls == 2  # one for the option, one for its future
    assert CandleGreeks.objects.filter(instrument=option).count() == len(first["candles"])

    inner_start = start + dt.timedelta(days=1)
    # The stored span ends at the last closed candle Kite returned (or its session's end),
    # not at the request's end, which may be later today.
    inner_end = HistoryCoverage.objects.get(instrument=option).end
    second = orjson.loads(get_history(staff_client, option.pk, inner_start, inner_end).content)
    assert second["source"] == "stored"
    assert sim.sim.rest_requests.get("market.historical", 0) == calls
    inside = [c for c in first["candles"] if inner_start <= dt.datetime.fromisoformat(c["ts"]) <= inner_end]
    assert second["candles"] == inside


def test_a_later_request_fetches_only_the_span_it_misses(staff_client, history_env, sim):
    option = nifty_option(with_future=True)
    start, end = last_sessions(6)
    middle = start + dt.timedelta(days=3)
    get_history(staff_client, option.pk, start, middle)
    assert HistoryCoverage.objects.filter(instrument=option).count() == 1
    whole = orjson.loads(get_history(staff_client, option.pk, start, end).content)
    assert whole["source"] == "computed"
    spans = list(HistoryCoverage.objects.filter(instrument=option).values_list("start", "end"))
    assert len(spans) == 1 and spans[0][0] == start  # the two spans were merged
    ts = [c["ts"] for c in whole["candles"]]
    assert ts == sorted(set(ts))  # no candle twice, none lost at the seam
    with sim_client(sim) as kite:
        assert len(ts) == len(kite.historical(option.pk, start, end, "minute"))


def test_coverage_ends_at_the_last_candle_kite_returned_not_the_clock(history_env, sim):
    """L2: a candle Kite publishes late must not fall into a span already marked complete."""
    option = nifty_option(with_future=True)
    day = timezone.now().astimezone(IST).date() - dt.timedelta(days=1)
    while day.weekday() >= 5:
        day -= dt.timedelta(days=1)
    start = dt.datetime.combine(day, dt.time(9, 15), tzinfo=IST)
    end = dt.datetime.combine(day, dt.time(12, 0, 30), tzinfo=IST)  # mid-session
    with ExitStack() as stack:
        result = history_get(
            instrument=option, interval="minute", start=start, end=end,
            client_factory=lambda: stack.enter_context(sim_client(sim)),
            r=R, q=0.0, now=end + dt.timedelta(hours=1),  # the clock is long past ``end``
        )  # fmt: skip
    last_candle = dt.datetime.fromtimestamp(int(result.table.ts_s[-1]), tz=dt.UTC)
    assert last_candle < end
    [span] = HistoryCoverage.objects.filter(instrument=option)
    assert span.end == last_candle
    # A later request up to the same end asks Kite again for what came after that candle.
    assert history_missing_start(instrument=option, interval="minute", start=start, end=end) is not None


def test_a_sessions_closing_candle_covers_the_rest_of_its_day(history_env, sim):
    option = nifty_option(with_future=True, kind="PE")
    day = timezone.now().astimezone(IST).date() - dt.timedelta(days=1)
    while day.weekday() >= 5:
        day -= dt.timedelta(days=1)
    start = dt.datetime.combine(day, dt.time(9, 15), tzinfo=IST)
    end = dt.datetime.combine(day, dt.time(20, 0), tzinfo=IST)
    with ExitStack() as stack:
        history_get(
            instrument=option, interval="minute", start=start, end=end,
            client_factory=lambda: stack.enter_context(sim_client(sim)),
            r=R, q=0.0, now=end + dt.timedelta(hours=1),
        )  # fmt: skip
    [span] = HistoryCoverage.objects.filter(instrument=option)
    assert span.end == end
    assert history_missing_start(instrument=option, interval="minute", start=start, end=end) is None


def test_an_option_without_a_future_uses_the_index_spot(staff_client, history_env, sim):
    option = nifty_option(with_future=False)
    index = Instrument.objects.get(tradingsymbol="NIFTY 50")
    start, end = last_sessions(3)
    body = orjson.loads(get_history(staff_client, option.pk, start, end, interval="5minute").content)
    assert body["underlying"]["kind"] == "spot"
    assert body["underlying"]["instrument_token"] == index.pk
    with sim_client(sim) as kite:
        opt = kite.historical(option.pk, start, end, "5minute")
        spot = kite.historical(index.pk, start, end, "5minute")
    opt_s = opt.ts.astype("datetime64[s]").astype(np.int64)
    assert np.array_equal(opt_s, spot.ts.astype("datetime64[s]").astype(np.int64))
    expected = compute_greeks_spot(
        price=opt.close, spot=spot.close, strike=option.strike, is_call=True, r=R, q=0.012,
        t_years=years_to_expiry(now_epoch_s=opt_s + 300.0, expiry_epoch_s=expiry_close_epoch_s(option.expiry)),
    )
    candles = body["candles"]
    np.testing.assert_allclose(column(candles, "iv"), expected.iv, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(column(candles, "delta"), expected.delta, rtol=1e-12, equal_nan=True)
    np.testing.assert_array_equal(column(candles, "underlying"), spot.close)
    assert all("spot_fallback" in c["flags"] for c in candles)


def test_a_range_longer_than_kite_allows_is_split(staff_client, history_env, sim):
    option = nifty_option(with_future=True)
    start, end = last_sessions(75)  # minute candles: at most 60 days per request
    response = get_history(staff_client, option.pk, start, end)
    assert response.status_code == 200
    assert sim.sim.rest_requests["market.historical"] == 4  # two spans each, option and future


def test_token_auth_works_and_anonymous_is_refused(client, history_env, django_user_model):
    option = nifty_option(with_future=True)
    start, end = last_sessions(1)
    assert get_history(client, option.pk, start, end).status_code == 401
    assert get_history(client, option.pk, start, end, HTTP_AUTHORIZATION="Token nope").status_code == 401
    user = django_user_model.objects.create_user("program")
    _, key = apitoken_create(user=user, name="bot")
    assert get_history(client, option.pk, start, end, HTTP_AUTHORIZATION=f"Token {key}").status_code == 200
    # A token without the 'read' scope is refused, naming the scope.
    _, subscribe_only = apitoken_create(user=user, name="sub", scopes=["subscribe"])
    response = get_history(client, option.pk, start, end, HTTP_AUTHORIZATION=f"Token {subscribe_only}")
    assert response.status_code == 403
    assert "'read'" in orjson.loads(response.content)["error"]["message"]
    # A logged-in trader (not staff) reads history with the session.
    client.force_login(django_user_model.objects.create_user("viewer"))
    assert get_history(client, option.pk, start, end).status_code == 200


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"to": "2026-11-20"}, "from"),
        ({"from": "2026-11-20", "to": "2026-11-19"}, None),
        ({"from": "2026-11-20", "to": "2026-11-20", "interval": "2minute"}, "interval"),
        ({"from": "yesterday", "to": "2026-11-20"}, "from"),
        ({"from": "2025-01-01", "to": "2026-11-20"}, None),  # far too many minute candles
    ],
)
def test_bad_queries_get_a_400_naming_the_field(staff_client, history_env, query, field):
    option = nifty_option(with_future=True)
    response = staff_client.get(f"/api/v1/history/{option.pk}", query)
    assert response.status_code == 400
    error = orjson.loads(response.content)["error"]
    assert error["code"] == "invalid_request"
    assert error.get("field") == field
    assert error["request_id"] == response["X-Request-ID"]


def test_unknown_instrument_is_a_404_naming_it(staff_client, history_env):
    start, end = last_sessions(1)
    response = get_history(staff_client, 999, start, end)
    assert response.status_code == 404
    assert "999" in orjson.loads(response.content)["error"]["message"]


def test_an_index_gets_its_candles_without_greeks(staff_client, history_env):
    index = Instrument.objects.get(tradingsymbol="NIFTY 50")
    # A week: two calendar days hold no session from Saturday to Monday's open (IST).
    start, end = last_sessions(7)
    response = get_history(staff_client, index.pk, start, end)
    assert response.status_code == 200, response.content
    body = orjson.loads(response.content)
    assert body["source"] == "kite" and body["kind"] == "EQ"
    assert len(body["candles"]) > 100
    assert set(body["candles"][0]) == {"ts", "open", "high", "low", "close", "volume", "oi"}


def test_continuous_is_for_futures_only(staff_client, history_env):
    index = Instrument.objects.get(tradingsymbol="NIFTY 50")
    start, end = last_sessions(1)
    response = staff_client.get(
        f"/api/v1/history/{index.pk}",
        {"from": start.isoformat(), "to": end.isoformat(), "continuous": "true"},
    )
    assert response.status_code == 400
    assert orjson.loads(response.content)["error"]["code"] == "continuous_needs_future"


def test_the_old_path_redirects_to_v1_keeping_the_query(staff_client, history_env):
    response = staff_client.get("/api/history/123?from=2026-11-20&to=2026-11-20")
    assert response.status_code == 308
    assert response["Location"] == "/api/v1/history/123?from=2026-11-20&to=2026-11-20"


def test_no_kite_session_is_a_503(staff_client, history_env, sim_account):
    sim_account.status = sim_account.Status.SESSION_EXPIRED
    sim_account.save()
    option = nifty_option(with_future=True)
    start, end = last_sessions(1)
    response = get_history(staff_client, option.pk, start, end)
    assert response.status_code == 503
    assert orjson.loads(response.content)["error"]["code"] == "no_kite_session"


def test_kite_errors_are_a_502_with_context(staff_client, history_env, sim):
    option = nifty_option(with_future=True)
    sim.call(sim.sim.fail_next, "market.historical", status=400, error_type="InputException",
             message="invalid token")
    start, end = last_sessions(1)
    response = get_history(staff_client, option.pk, start, end)
    assert response.status_code == 502
    assert "historical" in orjson.loads(response.content)["error"]["message"]
    assert not CandleGreeks.objects.exists()
    assert not HistoryCoverage.objects.exists()


def test_candles_without_an_underlying_price_get_flags_not_numbers():
    from subscriptions.history import greeks_for_candles

    option = Instrument(instrument_token=1, name="NIFTY", strike=26_000.0, instrument_type="CE",
                        expiry=dt.date(2026, 12, 29))
    t0 = int(dt.datetime(2026, 11, 20, 9, 15, tzinfo=IST).timestamp())
    option_ts = np.array([t0, t0 + 60, t0 + 120, t0 + 180], dtype=np.int64)
    # No underlying candle at t0 (none before either) and none at t0+120 (only the minute before).
    und_ts = np.array([t0 + 60, t0 + 180], dtype=np.int64)
    out = greeks_for_candles(
        option=option, option_ts_s=option_ts, option_close=np.full(4, 300.0),
        underlying_ts_s=und_ts, underlying_close=np.array([26_100.0, 26_120.0]),
        underlying_is_future=True, interval="minute", r=R, q=0.0,
    )
    iv = out["iv"]
    assert np.isnan(iv[0]) and np.isnan(iv[2])
    assert np.isfinite(iv[1]) and np.isfinite(iv[3])
    assert out["flags"][0] & Flag.NO_FORWARD
    assert out["flags"][2] & Flag.STALE_UNDERLYING
    assert np.isnan(out["underlying_price"][[0, 2]]).all()
    assert out["underlying_price"][[1, 3]].tolist() == [26_100.0, 26_120.0]
    for name in ("delta", "gamma", "theta", "vega", "rho"):
        assert np.isnan(out[name][[0, 2]]).all()


@pytest.mark.django_db(transaction=True)
def test_two_requests_computing_the_same_range_at_once_store_it_once(kite_settings, sim, market, redis_client):
    from subscriptions.history import history_get
    from subscriptions.models import HistoryCoverage as Coverage
    from tests.subscriptions.conftest import instruments_from_market, make_account, run_in_threads

    Instrument.objects.bulk_create(instruments_from_market(market))
    make_account()
    option = nifty_option(with_future=True)
    start, end = last_sessions(4)

    both_fetched = threading.Barrier(2)

    class InStep:
        """The REST client, but both requests reach the database write at the same moment."""

        def __init__(self, kite):
            self.kite = kite
            self.calls = 0

        def historical(self, *args, **kwargs):
            series = self.kite.historical(*args, **kwargs)
            self.calls += 1
            if self.calls == 2:  # the underlying: the last fetch before storing
                both_fetched.wait(timeout=30)
            return series

    def compute():
        with sim_client(sim) as kite:
            return history_get(instrument=option, interval="minute", start=start, end=end,
                               client_factory=lambda: InStep(kite), r=R, q=0.0)

    results = run_in_threads(compute, count=2)
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert {len(r.table) for r in results} == {CandleGreeks.objects.filter(instrument=option).count()}
    assert Coverage.objects.filter(instrument=option).count() == 1
