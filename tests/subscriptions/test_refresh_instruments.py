"""instruments_refresh and manage.py refresh_instruments: Kite's dump into the registry."""

from __future__ import annotations

import csv
import datetime as dt
import io

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from accounts.models import KiteAccount
from streaming.kite.rest import (
    KiteRateLimiter,
    KiteResponseError,
    KiteRestClient,
    parse_instruments_csv,
)
from streaming.kite.schemas import INSTRUMENT_CSV_COLUMNS
from streaming.market import IST, SyntheticMarket
from streaming.sim.simulator import KiteSimulator, SimulatorThread
from subscriptions.models import CandleGreeks, Instrument, Subscription
from subscriptions.services import (
    InstrumentDumpSuspicious,
    instruments_refresh,
    subscription_activate,
)

pytestmark = pytest.mark.django_db

API_KEY = "refreshkey"
ACCESS_TOKEN = "f" * 32
THURSDAY_14_IST = dt.datetime(2026, 11, 19, 14, 0, tzinfo=IST).timestamp()
TODAY = dt.date(2026, 11, 19)


class DumpSource:
    """Serves a CSV dump through the real parser, for scenarios the simulator cannot stage."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def instruments(self, exchange: str | None = None):
        rows = [r for r in self.rows if exchange is None or r["exchange"] == exchange]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=INSTRUMENT_CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return parse_instruments_csv(buf.getvalue().encode())


def option_row(token: int, symbol: str, *, expiry: dt.date = dt.date(2026, 11, 24), strike: float = 24000.0,
               kind: str = "CE", lot_size: int = 75) -> dict:
    return {
        "instrument_token": token, "exchange_token": token >> 8, "tradingsymbol": symbol,
        "name": "NIFTY", "last_price": 0.0, "expiry": expiry.isoformat(), "strike": strike,
        "tick_size": 0.05, "lot_size": lot_size, "instrument_type": kind, "segment": "NFO-OPT",
        "exchange": "NFO",
    }


def index_row(token: int, symbol: str) -> dict:
    return {
        "instrument_token": token, "exchange_token": token >> 8, "tradingsymbol": symbol,
        "name": symbol, "last_price": 0.0, "expiry": "", "strike": 0.0, "tick_size": 0.0,
        "lot_size": 0, "instrument_type": "EQ", "segment": "INDICES", "exchange": "NSE",
    }


def base_rows() -> list[dict]:
    rows = [index_row(256265, "NIFTY 50")]
    for i in range(20):
        strike = 23500 + 50 * i
        rows.append(option_row(10_000 + 2 * i, f"NIFTY26NOV{strike}CE", strike=strike))
        rows.append(option_row(10_001 + 2 * i, f"NIFTY26NOV{strike}PE", strike=strike, kind="PE"))
    return rows


def refresh(rows, **kwargs):
    return instruments_refresh(client=DumpSource(rows), today=TODAY, **kwargs)


def symbol(token: int) -> str:
    return Instrument.objects.get(pk=token).tradingsymbol


# --- the simulator end to end ------------------------------------------------------------------


@pytest.fixture
def sim():
    market = SyntheticMarket(seed=5, now_fn=lambda: THURSDAY_14_IST)
    simulator = KiteSimulator(market=market, tick_interval_ms=1000)
    simulator.register_account(api_key=API_KEY, api_secret="x" * 32, access_token=ACCESS_TOKEN)
    with SimulatorThread(simulator) as thread:
        yield thread


@pytest.fixture
def client(sim):
    limiter = KiteRateLimiter(requests_per_s={"other": 1000})
    with KiteRestClient(api_key=API_KEY, access_token=ACCESS_TOKEN, api_root=sim.http_url,
                        rate_limiter=limiter) as c:
        yield c


def test_first_refresh_loads_the_dump_and_a_second_changes_nothing(sim, client):
    market_rows = sim.call(lambda: list(sim.sim.market.instruments))
    first = instruments_refresh(client=client, today=TODAY)
    assert (first.fetched, first.created, first.updated, first.unchanged) == (len(market_rows), len(market_rows), 0, 0)
    assert Instrument.objects.count() == len(market_rows)
    option = next(r for r in market_rows if r["instrument_type"] == "PE")
    stored = Instrument.objects.get(pk=option["instrument_token"])
    assert (stored.tradingsymbol, stored.expiry, stored.strike, stored.lot_size, stored.segment) == (
        option["tradingsymbol"], option["expiry"], option["strike"], option["lot_size"], option["segment"]
    )
    index = Instrument.objects.get(tradingsymbol="NIFTY 50", exchange="NSE")
    assert index.expiry is None and index.instrument_type == "EQ"

    second = instruments_refresh(client=client, today=TODAY, batch_size=7)
    assert (second.created, second.updated, second.unchanged, second.deleted) == (0, 0, len(market_rows), 0)


def test_an_exchange_refresh_leaves_other_exchanges_alone(sim, client):
    instruments_refresh(client=client, today=TODAY)
    Instrument.objects.filter(exchange="NSE").update(lot_size=999)
    result = instruments_refresh(client=client, exchanges=["NFO"], today=TODAY)
    assert result.fetched == Instrument.objects.filter(exchange="NFO").count()
    assert result.updated == 0 and result.deleted == 0
    assert set(Instrument.objects.filter(exchange="NSE").values_list("lot_size", flat=True)) == {999}
    assert sim.call(lambda: sim.sim.rest_requests["market.instruments"]) == 1


def test_the_command_refreshes_with_the_first_streamable_account(sim, settings):
    settings.KITE_API_ROOT = sim.http_url
    KiteAccount.objects.create(label="off", api_key="disabledkey", status=KiteAccount.Status.DISABLED)
    account = KiteAccount.objects.create(label="main", api_key=API_KEY)
    from accounts.services import account_set_session

    account_set_session(account=account, access_token=ACCESS_TOKEN)
    out = io.StringIO()
    call_command("refresh_instruments", "--exchange", "nfo", stdout=out)
    nfo = Instrument.objects.filter(exchange="NFO").count()
    assert nfo > 0 and Instrument.objects.exclude(exchange="NFO").count() == 0
    assert f"fetched {nfo}: created {nfo}, updated 0" in out.getvalue()


def test_the_command_reports_kite_errors_and_missing_accounts(sim, settings):
    settings.KITE_API_ROOT = sim.http_url
    with pytest.raises(CommandError, match="no Kite account"):
        call_command("refresh_instruments")
    KiteAccount.objects.create(label="main", api_key=API_KEY)
    with pytest.raises(CommandError, match="no Kite account labelled 'other'"):
        call_command("refresh_instruments", "--account", "other")
    sim.call(sim.sim.fail_next, "market.instruments.all", 403, "PermissionException")
    with pytest.raises(CommandError, match="instruments: PermissionException"):
        call_command("refresh_instruments", "--account", "main")
    sim.call(sim.sim.corrupt_next, "market.instruments.all", kind="wrong_shape")
    with pytest.raises(CommandError, match="instruments response: field 'body'"):
        call_command("refresh_instruments", "--account", "main")
    assert Instrument.objects.count() == 0


# --- scenarios -------------------------------------------------------------------------------


def test_changed_rows_are_updated_and_engines_told(django_capture_on_commit_callbacks):
    rows = base_rows()
    refresh(rows)
    before = Instrument.objects.get(pk=10_000).updated_at
    rows[1]["lot_size"] = 65
    rows[2]["lot_size"] = 65
    rows[3]["last_price"] = 12.5
    with django_capture_on_commit_callbacks() as callbacks:
        result = refresh(rows)
    assert (result.created, result.updated, result.unchanged) == (0, 3, len(rows) - 3)
    assert Instrument.objects.get(pk=10_000).lot_size == 65
    assert Instrument.objects.get(pk=10_002).last_price == 12.5
    assert Instrument.objects.get(pk=10_000).updated_at > before
    assert len(callbacks) == 1
    with django_capture_on_commit_callbacks() as callbacks:
        refresh(rows)
    assert callbacks == []


def test_delisted_instruments_go_unless_something_references_them():
    rows = base_rows()
    refresh(rows)
    subscribed, with_history, plain = 10_004, 10_005, 10_006
    subscription = subscription_activate(instrument=Instrument.objects.get(pk=subscribed))
    CandleGreeks.objects.create(
        instrument_id=with_history, interval="minute", ts=timezone.now(), open=1, high=1, low=1,
        close=1, volume=0,
    )
    result = refresh([r for r in rows if r["instrument_token"] not in (subscribed, with_history, plain)])
    assert (result.deleted, result.kept_delisted) == (1, 2)
    assert not Instrument.objects.filter(pk=plain).exists()
    assert Instrument.objects.filter(pk__in=[subscribed, with_history]).count() == 2
    subscription.refresh_from_db()
    assert subscription.status == Subscription.Status.INACTIVE
    assert subscription.status_reason == "instrument NFO:NIFTY26NOV23600CE is no longer listed by Kite"
    assert result.subscriptions_deactivated == 1


def test_subscriptions_of_expired_instruments_are_deactivated_with_the_date():
    rows = base_rows()
    rows[1]["expiry"] = "2026-11-18"  # yesterday
    rows[2]["expiry"] = TODAY.isoformat()  # expires today: still trading
    refresh(rows)
    expired = subscription_activate(instrument=Instrument.objects.get(pk=10_000))
    live = subscription_activate(instrument=Instrument.objects.get(pk=10_001))
    untouched_reason = subscription_activate(instrument=Instrument.objects.get(pk=10_002))
    result = refresh(rows)
    expired.refresh_from_db()
    live.refresh_from_db()
    untouched_reason.refresh_from_db()
    assert (expired.status, expired.status_reason) == ("inactive", "instrument expired on 2026-11-18")
    assert live.status == untouched_reason.status == "active"
    assert result.subscriptions_deactivated == 1


def test_a_token_kite_reuses_for_another_contract_deactivates_its_subscription():
    rows = base_rows()
    refresh(rows)
    subscription = subscription_activate(instrument=Instrument.objects.get(pk=10_000))
    rows[1] = option_row(10_000, "NIFTY26DEC26000CE", expiry=dt.date(2026, 12, 29), strike=26000)
    result = refresh(rows)
    assert result.reassigned == 1 and result.updated == 1
    stored = Instrument.objects.get(pk=10_000)
    assert (stored.tradingsymbol, stored.strike) == ("NIFTY26DEC26000CE", 26000)
    subscription.refresh_from_db()
    assert subscription.status == "inactive"
    assert subscription.status_reason == (
        "instrument token 10000 now denotes NFO:NIFTY26DEC26000CE (was NFO:NIFTY26NOV23500CE)"
    )


def test_a_symbol_that_moved_to_a_new_token_is_renamed_out_of_the_way():
    rows = base_rows()
    refresh(rows)
    old_token, new_token = 10_000, 90_000
    subscription = subscription_activate(instrument=Instrument.objects.get(pk=old_token))
    rows[1] = {**rows[1], "instrument_token": new_token}
    result = refresh(rows)
    assert (result.created, result.reassigned, result.kept_delisted) == (1, 1, 1)
    assert symbol(new_token) == "NIFTY26NOV23500CE"
    assert symbol(old_token) == f"NIFTY26NOV23500CE~{old_token}"
    subscription.refresh_from_db()
    assert subscription.status == "inactive"
    assert subscription.status_reason == f"NFO:NIFTY26NOV23500CE moved from token {old_token} to {new_token}"
    # Unreferenced, the old row simply goes.
    rows[3] = {**rows[3], "instrument_token": 90_001}
    result = refresh(rows)
    assert result.deleted == 1 and not Instrument.objects.filter(pk=10_002).exists()
    assert symbol(90_001) == "NIFTY26NOV23550CE"


def test_two_tokens_swapping_symbols_apply_in_one_refresh():
    rows = base_rows()
    refresh(rows)
    rows[1]["tradingsymbol"], rows[2]["tradingsymbol"] = rows[2]["tradingsymbol"], rows[1]["tradingsymbol"]
    result = refresh(rows, batch_size=1)
    assert (result.updated, result.reassigned) == (2, 2)
    assert (symbol(10_000), symbol(10_001)) == ("NIFTY26NOV23500PE", "NIFTY26NOV23500CE")


def test_a_dump_much_smaller_than_the_registry_is_refused_unless_forced():
    rows = base_rows()
    refresh(rows)
    with pytest.raises(InstrumentDumpSuspicious, match="lists 5 NFO instruments, we hold 40"):
        refresh(rows[:6])
    assert Instrument.objects.count() == len(rows)
    result = refresh(rows[:6], force=True)
    assert result.deleted == 35 and Instrument.objects.count() == 6


def test_an_invalid_dump_changes_nothing():
    rows = base_rows()
    refresh(rows)
    broken = [dict(r) for r in rows]
    broken[-1]["strike"] = "abc"
    broken[1]["lot_size"] = 50
    with pytest.raises(KiteResponseError, match="field 'strike'"):
        refresh(broken)
    assert Instrument.objects.get(pk=10_000).lot_size == 75
