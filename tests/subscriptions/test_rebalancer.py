"""The strike rebalancer against PostgreSQL and the Kite simulator.

The simulator's underlying is moved across strikes; the rebalancer reads the price through
the REST fallback (no engine runs here) or an engine heartbeat, and the tests check the exact
set of subscriptions it owns after each run.
"""

from __future__ import annotations

import datetime as dt
import math
import threading
import time
from dataclasses import dataclass

import pytest
from django.db import connection
from django.utils import timezone

from streaming.greeks import expiry_close_epoch_s, years_to_expiry
from streaming.kite.rest import KiteRateLimiter, KiteRestClient
from streaming.models import EngineHeartbeat
from subscriptions.models import Instrument, RebalanceRule, Subscription
from subscriptions.rebalancer import LivePrices, PriceQuote, heartbeat_prices, rebalance_rule_apply
from tests.subscriptions.conftest import (
    SIM_ACCESS_TOKEN,
    SIM_API_KEY,
    instruments_from_market,
    make_account,
    run_in_threads,
)

CARRY = 0.065 - 0.012  # the synthetic market's r - q for NIFTY


@dataclass
class FixedPrice:
    """A price source that answers one price for every expiry (for hysteresis and cooldown)."""

    price: float | None

    def price_for(self, *, underlying, expiry):
        return None if self.price is None else PriceQuote(self.price, "test")


def first_expiry() -> dt.date:
    return (
        Instrument.objects.filter(name="NIFTY", instrument_type="CE", expiry__gte=timezone.localdate())
        .order_by("expiry")
        .values_list("expiry", flat=True)
        .first()
    )


def owned(rule: RebalanceRule) -> set[tuple[float, str]]:
    """(strike, CE/PE) of the rule's active subscriptions."""
    return set(
        Subscription.objects.filter(rebalance_rule=rule, status=Subscription.Status.ACTIVE).values_list(
            "instrument__strike", "instrument__instrument_type"
        )
    )


def band(*strikes: float) -> set[tuple[float, str]]:
    return {(k, t) for k in strikes for t in ("CE", "PE")}


def option(strike: float, kind: str, expiry: dt.date) -> Instrument:
    return Instrument.objects.get(name="NIFTY", expiry=expiry, strike=strike, instrument_type=kind)


@pytest.fixture
def rest_client(kite_settings, sim, redis_client):
    client = KiteRestClient(
        api_key=SIM_API_KEY,
        access_token=SIM_ACCESS_TOKEN,
        api_root=sim.http_url,
        rate_limiter=KiteRateLimiter.from_redis_url(kite_settings.REDIS_URL),
    )
    yield client
    client.close()


def sim_prices(rest_client) -> LivePrices:
    """The production price source with no engine running: REST ltp of the simulator."""
    return LivePrices(
        from_heartbeats={},
        rest_ltp=lambda keys: {k: q.last_price for k, q in rest_client.ltp(keys).items()},
    )


def move_forward_to(sim, expiry: dt.date, forward: float) -> None:
    """Set the simulator's NIFTY spot so that the forward of ``expiry`` is ``forward``."""
    t = float(years_to_expiry(now_epoch_s=timezone.now().timestamp(), expiry_epoch_s=expiry_close_epoch_s(expiry)))
    sim.call(sim.sim.market.set_spot, "NIFTY", forward / math.exp(CARRY * t))


@pytest.mark.django_db
def test_the_band_follows_the_simulator_across_strikes(sim, sim_instruments, sim_account, rest_client):
    expiry = first_expiry()
    rule = RebalanceRule.objects.create(
        name="nifty", underlying="NIFTY", expiries_next_n=1, strikes_each_side=2,
        hysteresis_steps=0.6, cooldown_s=0,
    )
    # An ops-made subscription inside the first band, and an inactive one further up.
    manual_ce = Subscription.objects.create(instrument=option(26_000.0, "CE", expiry), mode="quote")
    manual_off = Subscription.objects.create(
        instrument=option(26_300.0, "PE", expiry), status=Subscription.Status.INACTIVE,
        status_reason="turned off by ops",
    )

    def run():
        return rebalance_rule_apply(rule_id=rule.pk, prices=sim_prices(rest_client))

    move_forward_to(sim, expiry, 26_010.0)
    out = run()
    # 26000 CE is manual: covered, not duplicated.
    assert owned(rule) == band(25_900, 25_950, 26_000, 26_050, 26_100) - {(26_000.0, "CE")}
    assert (out.activated, out.deactivated) == (9, 0)
    rule.refresh_from_db()
    assert rule.center_strike == 26_000.0
    assert "REST ltp" in rule.last_result
    assert "step 50, lot 75" in rule.last_result  # both from the instrument dump

    move_forward_to(sim, expiry, 26_028.0)  # 0.56 steps: inside the hysteresis
    out = run()
    assert (out.activated, out.deactivated, out.recentred) == (0, 0, False)
    assert RebalanceRule.objects.get(pk=rule.pk).center_strike == 26_000.0

    move_forward_to(sim, expiry, 26_040.0)  # 0.8 steps: one strike up
    out = run()
    assert owned(rule) == band(25_950, 26_000, 26_050, 26_100, 26_150) - {(26_000.0, "CE")}
    assert (out.activated, out.deactivated) == (2, 2)
    retired = Subscription.objects.get(instrument=option(25_900.0, "CE", expiry))
    assert retired.status == Subscription.Status.INACTIVE
    assert retired.status_reason == "outside the band of rule nifty"

    move_forward_to(sim, expiry, 26_230.0)  # four strikes in one move
    out = run()
    assert owned(rule) == band(26_150, 26_200, 26_250, 26_300, 26_350) - {(26_300.0, "PE")}
    assert (out.activated, out.deactivated) == (7, 7)
    assert "inactive manual/API subscription" in RebalanceRule.objects.get(pk=rule.pk).last_result

    move_forward_to(sim, expiry, 25_880.0)  # and back down below the start
    run()
    assert owned(rule) == band(25_800, 25_850, 25_900, 25_950, 26_000) - {(26_000.0, "CE")}

    # The manual subscriptions were never touched, whatever the band did.
    manual_ce.refresh_from_db()
    manual_off.refresh_from_db()
    assert (manual_ce.source, manual_ce.status, manual_ce.mode) == ("manual", "active", "quote")
    assert manual_ce.rebalance_rule_id is None
    assert (manual_off.status, manual_off.status_reason) == ("inactive", "turned off by ops")
    # Re-activated rows were reused: one subscription per instrument, never a duplicate.
    assert Subscription.objects.filter(instrument=option(26_150.0, "CE", expiry)).count() == 1


@pytest.mark.django_db
def test_a_manual_subscription_leaving_the_band_stays(sim_instruments, sim_account):
    expiry = first_expiry()
    rule = RebalanceRule.objects.create(name="r", underlying="NIFTY", expiries_next_n=1,
                                        strikes_each_side=1, cooldown_s=0)
    manual = Subscription.objects.create(instrument=option(26_000.0, "PE", expiry))
    rebalance_rule_apply(rule_id=rule.pk, prices=FixedPrice(26_000.0))
    rebalance_rule_apply(rule_id=rule.pk, prices=FixedPrice(26_500.0))
    manual.refresh_from_db()
    assert (manual.status, manual.source) == ("active", "manual")
    assert owned(rule) == band(26_450, 26_500, 26_550)


@pytest.mark.django_db
def test_cooldown_holds_the_band_then_lets_it_move(sim_instruments, sim_account):
    rule = RebalanceRule.objects.create(name="r", underlying="NIFTY", expiries_next_n=1,
                                        strikes_each_side=1, cooldown_s=300, hysteresis_steps=0.6)
    t0 = timezone.now()
    rebalance_rule_apply(rule_id=rule.pk, prices=FixedPrice(26_000.0), now=t0)
    assert owned(rule) == band(25_950, 26_000, 26_050)

    out = rebalance_rule_apply(rule_id=rule.pk, prices=FixedPrice(26_200.0), now=t0 + dt.timedelta(seconds=60))
    assert not out.changed
    assert owned(rule) == band(25_950, 26_000, 26_050)
    assert "cooldown" in RebalanceRule.objects.get(pk=rule.pk).last_result

    out = rebalance_rule_apply(rule_id=rule.pk, prices=FixedPrice(26_200.0), now=t0 + dt.timedelta(seconds=301))
    assert out.recentred
    assert owned(rule) == band(26_150, 26_200, 26_250)
    assert RebalanceRule.objects.get(pk=rule.pk).last_rebalanced_at == t0 + dt.timedelta(seconds=301)


@pytest.mark.django_db
def test_each_expiry_has_its_own_band_and_a_rolled_off_expiry_is_retired(sim_instruments, sim_account):
    expiries = list(
        Instrument.objects.filter(name="NIFTY", instrument_type="CE", expiry__gte=timezone.localdate())
        .order_by("expiry").values_list("expiry", flat=True).distinct()
    )
    rule = RebalanceRule.objects.create(name="r", underlying="NIFTY", expiries_next_n=2,
                                        strikes_each_side=0, cooldown_s=0)
    rebalance_rule_apply(rule_id=rule.pk, prices=FixedPrice(26_000.0))
    active = set(Subscription.objects.filter(rebalance_rule=rule, status="active")
                 .values_list("instrument__expiry", "instrument__strike", "instrument__instrument_type"))
    assert active == {(e, 26_000.0, t) for e in expiries[:2] for t in ("CE", "PE")}
    assert RebalanceRule.objects.get(pk=rule.pk).centers == {e.isoformat(): 26_000.0 for e in expiries[:2]}

    # Ops narrow the rule to explicit expiries: the second one's strikes are retired.
    rule.expiries_next_n = None
    rule.expiries_explicit = [expiries[0].isoformat(), "not-a-date"]
    rule.save()
    rebalance_rule_apply(rule_id=rule.pk, prices=FixedPrice(26_000.0))
    assert set(Subscription.objects.filter(rebalance_rule=rule, status="active")
               .values_list("instrument__expiry", flat=True)) == {expiries[0]}
    assert "ignored expiry 'not-a-date'" in RebalanceRule.objects.get(pk=rule.pk).last_result


@pytest.mark.django_db
def test_capacity_fills_nearest_the_money_and_says_what_did_not_fit(sim_instruments, sim_account):
    rule = RebalanceRule.objects.create(name="r", underlying="NIFTY", expiries_next_n=1,
                                        strikes_each_side=2, cooldown_s=0)
    out = rebalance_rule_apply(rule_id=rule.pk, prices=FixedPrice(26_000.0), capacity_per_account=6)
    assert owned(rule) == band(25_950, 26_000, 26_050)
    assert out.activated == 6
    result = RebalanceRule.objects.get(pk=rule.pk).last_result
    assert "cannot fit 2 strikes: capacity 6 on 1 account(s), 0 used by other subscriptions" in result


@pytest.mark.django_db
def test_a_pinned_rule_counts_only_its_account(sim_instruments, sim_account):
    other = make_account("other")
    expiry = first_expiry()
    # Three manual subscriptions pinned to the rule's account use its capacity.
    for strike in (25_300.0, 25_350.0, 25_400.0):
        Subscription.objects.create(instrument=option(strike, "CE", expiry), pinned_account=sim_account)
    rule = RebalanceRule.objects.create(name="r", underlying="NIFTY", expiries_next_n=1,
                                        strikes_each_side=1, cooldown_s=0, pinned_account=sim_account,
                                        mode="ltp")
    rebalance_rule_apply(rule_id=rule.pk, prices=FixedPrice(26_000.0), capacity_per_account=7)
    assert owned(rule) == band(26_000) | {(25_950.0, "CE"), (25_950.0, "PE")}
    assert set(Subscription.objects.filter(rebalance_rule=rule).values_list("pinned_account", "mode")) == {
        (sim_account.pk, "ltp")
    }
    # The other account's capacity does not help a pinned rule.
    assert other.pk != sim_account.pk
    assert "pinned account main" in RebalanceRule.objects.get(pk=rule.pk).last_result


@pytest.mark.django_db
def test_disabled_rule_retires_what_it_owns(sim_instruments, sim_account):
    rule = RebalanceRule.objects.create(name="r", underlying="NIFTY", expiries_next_n=1,
                                        strikes_each_side=1, cooldown_s=0)
    rebalance_rule_apply(rule_id=rule.pk, prices=FixedPrice(26_000.0))
    assert len(owned(rule)) == 6
    RebalanceRule.objects.filter(pk=rule.pk).update(enabled=False)
    out = rebalance_rule_apply(rule_id=rule.pk, prices=FixedPrice(26_000.0))
    assert out.deactivated == 6
    assert owned(rule) == set()
    assert set(Subscription.objects.filter(rebalance_rule=rule).values_list("status_reason", flat=True)) == {
        "rule r disabled"
    }


@pytest.mark.django_db
def test_no_price_leaves_the_band_alone(sim_instruments, sim_account):
    rule = RebalanceRule.objects.create(name="r", underlying="NIFTY", expiries_next_n=1,
                                        strikes_each_side=1, cooldown_s=0)
    out = rebalance_rule_apply(rule_id=rule.pk, prices=FixedPrice(None))
    assert not out.changed
    assert "no live price, no centre yet, skipped" in RebalanceRule.objects.get(pk=rule.pk).last_result
    rebalance_rule_apply(rule_id=rule.pk, prices=FixedPrice(26_000.0))
    out = rebalance_rule_apply(rule_id=rule.pk, prices=FixedPrice(None))
    assert not out.changed
    assert owned(rule) == band(25_950, 26_000, 26_050)


@pytest.mark.django_db
def test_the_engine_forward_from_the_heartbeat_comes_first(sim_instruments, sim_account):
    expiry = first_expiry()
    now = timezone.now()
    hb = EngineHeartbeat.objects.create(
        engine_id="e1", hostname="h", pid=1, started_at=now, updated_at=now,
        state={"mode": "live", "underlyings": {"NIFTY": {
            "price": 25_500.0, "ts": int(now.timestamp()), "forwards": {expiry.isoformat(): 25_610.0},
        }}},
    )
    def rest_ltp(keys):
        raise AssertionError(f"REST must not be called while the engine has a price: {keys}")

    prices = LivePrices(from_heartbeats=heartbeat_prices([hb], now=now, max_age_s=30), rest_ltp=rest_ltp)
    rule = RebalanceRule.objects.create(name="r", underlying="NIFTY", expiries_next_n=1,
                                        strikes_each_side=0, cooldown_s=0)
    rebalance_rule_apply(rule_id=rule.pk, prices=prices, now=now)
    assert owned(rule) == band(25_600)
    assert "engine forward" in RebalanceRule.objects.get(pk=rule.pk).last_result


class RendezvousPrice:
    """A fixed price whose first call in each run waits, inside the rule's transaction, until
    the other run is either blocked on a database lock or inside its own transaction too.

    With the rule's row lock the second run is found blocked (and must then find the work
    done); without it both runs would be inside at once and both would subscribe the band.
    """

    def __init__(self, price: float, *, timeout_s: float = 10.0) -> None:
        self.price = price
        self.timeout_s = timeout_s
        self.inside = 0
        self.saw_lock_wait = False
        self._mutex = threading.Lock()
        self._seen = threading.local()

    def _other_backend_waits_on_a_lock(self) -> bool:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
            )
            return cursor.fetchone()[0] > 0

    def price_for(self, *, underlying, expiry):
        if not getattr(self._seen, "done", False):
            self._seen.done = True
            with self._mutex:
                self.inside += 1
            deadline = time.monotonic() + self.timeout_s
            while time.monotonic() < deadline:
                with self._mutex:
                    if self.inside >= 2:
                        break
                if self._other_backend_waits_on_a_lock():
                    self.saw_lock_wait = True
                    break
                time.sleep(0.01)
        return PriceQuote(self.price, "test")


@pytest.mark.django_db(transaction=True)
def test_two_workers_running_the_same_rule_at_once_give_the_result_of_one(market):
    Instrument.objects.bulk_create(instruments_from_market(market))
    make_account()
    rule = RebalanceRule.objects.create(name="r", underlying="NIFTY", expiries_next_n=2,
                                        strikes_each_side=5, cooldown_s=0)
    prices = RendezvousPrice(26_000.0)
    outcomes = run_in_threads(lambda: rebalance_rule_apply(rule_id=rule.pk, prices=prices), count=2)
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    assert errors == []
    # The runs overlapped: the second waited on the rule's row lock while the first worked...
    assert prices.saw_lock_wait
    # ...so one run did the work and the other found none left.
    assert sorted(o.activated for o in outcomes) == [0, 44]
    assert Subscription.objects.filter(rebalance_rule=rule, status="active").count() == 44
    assert Subscription.objects.count() == 44
    # And a later single run agrees that nothing is missing.
    again = rebalance_rule_apply(rule_id=rule.pk, prices=FixedPrice(26_000.0))
    assert (again.activated, again.deactivated) == (0, 0)


@pytest.mark.django_db
def test_rule_and_history_sizes_are_bounded():
    from django.core.exceptions import ValidationError

    from subscriptions.models import HistoryRange

    with pytest.raises(ValidationError, match="strikes_each_side"):
        RebalanceRule(name="huge", underlying="NIFTY", strikes_each_side=32_767).full_clean()
    option = Instrument.objects.create(
        instrument_token=4242, exchange_token=1, tradingsymbol="X", name="NIFTY",
        instrument_type="CE", segment="NFO-OPT", exchange="NFO",
    )
    with pytest.raises(ValidationError, match="days_back"):
        HistoryRange(instrument=option, days_back=32_767).full_clean()
