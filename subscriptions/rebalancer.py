"""The strike rebalancer: keep each rule's CE/PE band around the money subscribed.

The band of one expiry is the listed strikes within ``strikes_each_side`` positions of its
centre strike. The centre follows the live price of that expiry (the engine's forward, else
the underlying, else a REST quote) with hysteresis (it moves only when the price is more than
``hysteresis_steps`` strike steps away) and a cooldown (no re-centre within ``cooldown_s`` of
the last one). Strike steps come from the instrument dump, never from constants.

The band maths are pure functions at the top of this module; :func:`rebalance_rule_apply`
applies one rule inside one transaction holding the rule's row lock, so two workers running
the same rule at the same moment serialise and the second finds nothing left to do.

Ownership: the rebalancer creates subscriptions with ``source=rebalancer`` and the rule as
owner, and only ever deactivates the ones its rule owns. A manual or API subscription is never
changed: an active one counts as covering its instrument.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import structlog
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from accounts.models import IST, KiteAccount
from streaming import status
from streaming.greeks import expiry_close_epoch_s, years_to_expiry
from streaming.kite.limits import MAX_INSTRUMENTS_PER_API_KEY
from streaming.models import EngineHeartbeat
from subscriptions import services
from subscriptions.models import Instrument, RebalanceRule, Subscription
from subscriptions.underlyings import underlying_futures, underlying_spot

log = structlog.get_logger(__name__)

OPTION_TYPES = (Instrument.Type.CALL, Instrument.Type.PUT)


# --------------------------------------------------------------------------------------------
# Band maths (pure)


def strike_step(strikes: Iterable[float]) -> float | None:
    """The smallest positive gap between consecutive listed strikes, or None for < 2 strikes."""
    arr = np.unique(np.asarray(list(strikes), dtype=np.float64))
    if arr.size < 2:
        return None
    gaps = np.diff(arr)
    gaps = gaps[gaps > 0]
    return float(gaps.min()) if gaps.size else None


def nearest_strike(strikes: np.ndarray, price: float) -> float:
    """The listed strike nearest ``price``; the lower one on an exact tie."""
    i = int(np.searchsorted(strikes, price))
    if i == 0:
        return float(strikes[0])
    if i >= strikes.size:
        return float(strikes[-1])
    lower, upper = float(strikes[i - 1]), float(strikes[i])
    return lower if price - lower <= upper - price else upper


@dataclass(frozen=True, slots=True)
class CentreDecision:
    """Where one expiry's band is centred after this run, and why."""

    centre: float | None
    moved: bool
    reason: str


def choose_centre(
    *,
    strikes: np.ndarray,
    price: float | None,
    current: float | None,
    step: float,
    hysteresis_steps: float,
    in_cooldown: bool,
) -> CentreDecision:
    """Decide the centre strike of one expiry's band.

    ``strikes`` sorted ascending; ``current`` the centre so far (None on a first run or when it
    is no longer listed). The centre moves to the strike nearest ``price`` only when the price
    is more than ``hysteresis_steps * step`` away from it and no cooldown is running.
    """
    if current is not None and not np.any(np.isclose(strikes, current)):
        current = None
    if price is None or not math.isfinite(price) or price <= 0:
        if current is None:
            return CentreDecision(None, False, "no price")
        return CentreDecision(current, False, "no price, centre kept")
    if current is None:
        return CentreDecision(nearest_strike(strikes, price), True, "first centre")
    distance_steps = abs(price - current) / step
    if distance_steps <= hysteresis_steps:
        return CentreDecision(current, False, "within hysteresis")
    target = nearest_strike(strikes, price)
    if math.isclose(target, current):
        return CentreDecision(current, False, "nearest strike unchanged")
    if in_cooldown:
        return CentreDecision(current, False, "cooldown")
    return CentreDecision(target, True, f"moved {distance_steps:.2f} steps")


def band_strikes(strikes: np.ndarray, centre: float, each_side: int) -> np.ndarray:
    """The listed strikes within ``each_side`` positions of ``centre`` (sorted ``strikes``)."""
    i = int(np.argmin(np.abs(strikes - centre)))
    return strikes[max(0, i - each_side) : i + each_side + 1]


@dataclass(frozen=True, slots=True)
class TargetInstrument:
    token: int
    expiry: dt.date
    strike: float
    distance_steps: float


def order_by_moneyness(targets: Iterable[TargetInstrument]) -> list[TargetInstrument]:
    """Nearest the money first, then nearest expiry, then strike, then token: fill order."""
    return sorted(targets, key=lambda t: (t.distance_steps, t.expiry, t.strike, t.token))


# --------------------------------------------------------------------------------------------
# Live prices


@dataclass(frozen=True, slots=True)
class PriceQuote:
    price: float
    source: str


class PriceSource(Protocol):
    def price_for(self, *, underlying: str, expiry: dt.date) -> PriceQuote | None: ...


def heartbeat_prices(
    heartbeats: Iterable[EngineHeartbeat],
    *,
    now: dt.datetime,
    max_age_s: float,
    include_mock: bool = False,
) -> dict[str, status.LivePrice]:
    """Fresh underlying prices and forwards from engine heartbeats, by the one rule
    (``streaming.status.live_prices``): mock engines count only with ``include_mock`` (the
    demo), so bands never follow made-up prices overnight. An unreadable status document is
    logged as an error, never guessed from.
    """
    parsed = status.parse_heartbeats(heartbeats)
    for exc in parsed.errors:
        log.error("rebalancer.engine_status_invalid", engine=exc.engine_id, error=exc.error)
    return status.live_prices(
        parsed.statuses, now_s=now.timestamp(), max_age_s=max_age_s, include_mock=include_mock
    )


@dataclass
class LivePrices:
    """Prices for the rebalancer: engine heartbeats first, REST quotes as the fallback.

    ``rest_ltp`` takes ``EXCHANGE:TRADINGSYMBOL`` keys and returns last prices; it is called
    at most once per underlying per run, only when no engine reports a fresh price. From REST
    an expiry's forward is its own future's price; an expiry without a future (weeklies) gets
    the spot carried at the rate implied by the nearest future, ``S (F/S)^(T/T_F)``; failing
    that, the spot, or the nearest future.
    """

    from_heartbeats: Mapping[str, status.LivePrice]
    rest_ltp: Callable[[list[str]], Mapping[str, float]] | None = None
    now: dt.datetime | None = None
    _rest_cache: dict[str, _RestQuotes] = field(default_factory=dict)

    def price_for(self, *, underlying: str, expiry: dt.date) -> PriceQuote | None:
        live = self.from_heartbeats.get(underlying)
        quote = live.for_expiry(expiry) if live is not None else None
        if quote is not None:
            price, source = quote
            return PriceQuote(price, f"engine {source}")
        if self.rest_ltp is None:
            return None
        quotes = self._rest_cache.get(underlying)
        if quotes is None:
            quotes = self._rest_cache[underlying] = self._fetch_rest(underlying)
        return quotes.forward(expiry)

    def _fetch_rest(self, underlying: str) -> _RestQuotes:
        now = self.now or timezone.now()
        futures = underlying_futures(name=underlying, on_or_after=now.astimezone(IST).date())
        spot = underlying_spot(name=underlying)
        keys = [str(f) for f in futures] + ([str(spot)] if spot is not None else [])
        prices = self.rest_ltp(keys) if (self.rest_ltp and keys) else {}

        def usable(key: str) -> float | None:
            price = prices.get(key)
            return float(price) if price is not None and math.isfinite(price) and price > 0 else None

        return _RestQuotes(
            now_epoch_s=now.timestamp(),
            futures=[(f.expiry, str(f), p) for f in futures if (p := usable(str(f))) is not None],
            spot=(str(spot), p) if spot is not None and (p := usable(str(spot))) else None,
        )


@dataclass(frozen=True, slots=True)
class _RestQuotes:
    now_epoch_s: float
    futures: list[tuple[dt.date, str, float]]  # nearest expiry first
    spot: tuple[str, float] | None

    def forward(self, expiry: dt.date) -> PriceQuote | None:
        for fut_expiry, key, price in self.futures:
            if fut_expiry == expiry:
                return PriceQuote(price, f"REST ltp {key}")
        if self.spot is not None:
            spot_key, spot = self.spot
            if self.futures:
                fut_expiry, key, fut = self.futures[0]
                t_future = float(years_to_expiry(now_epoch_s=self.now_epoch_s,
                                                  expiry_epoch_s=expiry_close_epoch_s(fut_expiry)))
                t_expiry = float(years_to_expiry(now_epoch_s=self.now_epoch_s,
                                                  expiry_epoch_s=expiry_close_epoch_s(expiry)))
                if t_future > 0 and t_expiry > 0:
                    carried = spot * (fut / spot) ** (t_expiry / t_future)
                    return PriceQuote(carried, f"REST ltp {spot_key} carried as {key}")
            return PriceQuote(spot, f"REST ltp {spot_key}")
        if self.futures:
            _, key, price = self.futures[0]
            return PriceQuote(price, f"REST ltp {key} (nearest future)")
        return None


# --------------------------------------------------------------------------------------------
# Applying a rule


@dataclass
class RebalanceOutcome:
    """What one run of one rule did; ``lines`` is what the admin shows as last_result."""

    rule_id: int
    activated: int = 0
    deactivated: int = 0
    recentred: bool = False
    lines: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.activated or self.deactivated)


def rule_expiries(*, rule: RebalanceRule, today: dt.date) -> tuple[list[dt.date], list[str]]:
    """The expiries a rule follows from ``today`` on, as dates, and any problems found."""
    problems: list[str] = []
    listed = list(
        Instrument.objects.filter(
            name=rule.underlying, instrument_type__in=OPTION_TYPES, expiry__gte=today
        )
        .values_list("expiry", flat=True)
        .distinct()
        .order_by("expiry")
    )
    if rule.expiries_next_n:
        return listed[: rule.expiries_next_n], problems
    chosen: list[dt.date] = []
    listed_set = set(listed)
    for raw in rule.expiries_explicit or []:
        try:
            expiry = dt.date.fromisoformat(str(raw))
        except ValueError:
            problems.append(f"ignored expiry {raw!r}: not an ISO date")
            continue
        if expiry < today:
            continue
        if expiry not in listed_set:
            problems.append(f"no {rule.underlying} options listed for expiry {expiry.isoformat()}")
            continue
        chosen.append(expiry)
    return sorted(set(chosen)), problems


def rule_capacity(*, rule: RebalanceRule, capacity_per_account: int) -> tuple[int, int, str]:
    """(capacity, used by other subscriptions, description) for the rule's instruments.

    Capacity counts accounts that are not disabled: an account whose session expired at 06:00
    streams again after the morning login, and shrinking every band for those hours would only
    churn subscriptions.
    """
    active_others = Subscription.objects.filter(status=Subscription.Status.ACTIVE).exclude(
        rebalance_rule=rule
    )
    if rule.pinned_account_id is not None:
        usable = KiteAccount.objects.filter(pk=rule.pinned_account_id).exclude(
            status=KiteAccount.Status.DISABLED
        ).exists()
        capacity = capacity_per_account if usable else 0
        used = active_others.filter(pinned_account_id=rule.pinned_account_id).count()
        return capacity, used, f"pinned account {rule.pinned_account}"
    accounts = KiteAccount.objects.exclude(status=KiteAccount.Status.DISABLED).count()
    used = active_others.count()
    return accounts * capacity_per_account, used, f"{accounts} account(s)"


@dataclass(frozen=True, slots=True)
class _ChainRow:
    token: int
    expiry: dt.date
    strike: float
    lot_size: int


def rebalance_rule_apply(
    *,
    rule_id: int,
    prices: PriceSource,
    now: dt.datetime | None = None,
    capacity_per_account: int = MAX_INSTRUMENTS_PER_API_KEY,
) -> RebalanceOutcome:
    """Run one rule: move its bands, subscribe what is missing, retire what it owns outside.

    Everything happens in one transaction that holds the rule's row lock
    (``SELECT ... FOR UPDATE``): a second worker running the same rule waits, then re-reads
    the rule and the subscriptions and finds the work done. The writes are services', which
    tell the engines after commit when something changed.
    """
    now = now or timezone.now()
    today = now.astimezone(IST).date()
    with transaction.atomic():
        rule = (
            RebalanceRule.objects.select_for_update(of=("self",))
            .select_related("pinned_account")
            .get(pk=rule_id)
        )
        outcome = RebalanceOutcome(rule_id=rule.pk)
        if not rule.enabled:
            outcome.deactivated = services.rebalancer_subscriptions_retire(
                subscriptions=Subscription.objects.filter(rebalance_rule=rule),
                reason=f"rule {rule.name} disabled",
            )
            outcome.lines.append(f"disabled: retired {outcome.deactivated}")
        else:
            _apply_enabled(rule=rule, prices=prices, now=now, today=today, outcome=outcome,
                           capacity_per_account=capacity_per_account)  # fmt: skip
        rule.last_result = "\n".join(outcome.lines)[:4000]
        rule.save(update_fields=["center_strike", "centers", "last_rebalanced_at", "last_result",
                                 "updated_at"])  # fmt: skip
    log.info(
        "rebalancer.rule_applied", rule=rule.name, activated=outcome.activated,
        deactivated=outcome.deactivated, recentred=outcome.recentred,
    )  # fmt: skip
    return outcome


def _lot_text(chain: Sequence[_ChainRow]) -> str:
    """The chain's lot size from the dump (several when Kite lists a revised lot mid-series)."""
    lots = sorted({row.lot_size for row in chain})
    return "/".join(str(lot) for lot in lots) or "?"


def _apply_enabled(
    *,
    rule: RebalanceRule,
    prices: PriceSource,
    now: dt.datetime,
    today: dt.date,
    outcome: RebalanceOutcome,
    capacity_per_account: int,
) -> None:
    expiries, problems = rule_expiries(rule=rule, today=today)
    outcome.lines.extend(problems)
    rows = [
        _ChainRow(token, expiry, strike, lot_size)
        for token, expiry, strike, lot_size in Instrument.objects.filter(
            name=rule.underlying, instrument_type__in=OPTION_TYPES, expiry__in=expiries
        ).values_list("instrument_token", "expiry", "strike", "lot_size")
    ]
    by_expiry: dict[dt.date, list[_ChainRow]] = {e: [] for e in expiries}
    for row in rows:
        by_expiry[row.expiry].append(row)

    in_cooldown = rule.last_rebalanced_at is not None and (
        now - rule.last_rebalanced_at
    ).total_seconds() < rule.cooldown_s
    old_centres: dict[str, Any] = dict(rule.centers or {})
    new_centres: dict[str, float] = {}
    targets: list[TargetInstrument] = []
    # Expiries whose band cannot be computed this run keep their subscriptions as they are.
    frozen_expiries: set[dt.date] = set()
    moved_any = False
    for expiry in expiries:
        chain = by_expiry[expiry]
        strikes = np.unique(np.fromiter((r.strike for r in chain), dtype=np.float64))
        step = strike_step(strikes)
        iso = expiry.isoformat()
        if step is None:
            outcome.lines.append(f"{iso}: fewer than two strikes listed, skipped")
            frozen_expiries.add(expiry)
            continue
        quote = prices.price_for(underlying=rule.underlying, expiry=expiry)
        current = old_centres.get(iso)
        decision = choose_centre(
            strikes=strikes,
            price=quote.price if quote else None,
            current=float(current) if isinstance(current, int | float) else None,
            step=step,
            hysteresis_steps=rule.hysteresis_steps,
            in_cooldown=in_cooldown,
        )
        price_text = f"{quote.price:.2f} ({quote.source})" if quote else "no live price"
        if decision.centre is None:
            outcome.lines.append(f"{iso}: {price_text}, no centre yet, skipped")
            frozen_expiries.add(expiry)
            continue
        moved_any |= decision.moved
        new_centres[iso] = decision.centre
        outcome.lines.append(
            f"{iso}: centre {decision.centre:g} ({decision.reason}), step {step:g}, "
            f"lot {_lot_text(chain)}, price {price_text}"
        )
        band = set(band_strikes(strikes, decision.centre, rule.strikes_each_side).tolist())
        targets.extend(
            TargetInstrument(r.token, expiry, r.strike, abs(r.strike - decision.centre) / step)
            for r in chain
            if r.strike in band
        )
    # Keep the centres of frozen expiries so they resume where they were.
    for expiry in frozen_expiries:
        iso = expiry.isoformat()
        if iso in old_centres:
            new_centres[iso] = old_centres[iso]
    outcome.recentred = moved_any
    rule.centers = new_centres
    # The admin's one-number summary: the centre of the nearest expiry.
    rule.center_strike = new_centres.get(expiries[0].isoformat()) if expiries else None
    if moved_any:
        rule.last_rebalanced_at = now

    _sync_subscriptions(
        rule=rule,
        ordered=order_by_moneyness(targets),
        frozen_expiries=frozen_expiries,
        outcome=outcome,
        capacity_per_account=capacity_per_account,
    )


def _sync_subscriptions(
    *,
    rule: RebalanceRule,
    ordered: Sequence[TargetInstrument],
    frozen_expiries: set[dt.date],
    outcome: RebalanceOutcome,
    capacity_per_account: int,
) -> None:
    tokens = [t.token for t in ordered]
    existing = {
        s.instrument_id: s
        for s in Subscription.objects.select_for_update(of=("self",)).filter(
            Q(instrument_id__in=tokens) | Q(rebalance_rule=rule)
        ).select_related("instrument")
    }
    capacity, used_by_others, capacity_text = rule_capacity(
        rule=rule, capacity_per_account=capacity_per_account
    )
    room = max(capacity - used_by_others, 0)
    keep: set[int] = set()  # rule-owned and active after this run
    create: list[int] = []
    claim: list[int] = []  # existing rows to (re)activate as this rule's
    blocked_manual = 0
    left_out: list[TargetInstrument] = []
    for target in ordered:
        sub = existing.get(target.token)
        active = sub is not None and sub.status == Subscription.Status.ACTIVE
        if sub is not None and sub.source != Subscription.Source.REBALANCER:
            if not active:
                blocked_manual += 1
            continue  # manual/API: never touched; active ones cover the instrument
        if active and sub.rebalance_rule_id not in (None, rule.pk):
            continue  # another rule streams it: covered, and not ours to take
        if len(keep) >= room:
            left_out.append(target)
            continue
        keep.add(target.token)
        if sub is None:
            create.append(target.token)
        elif (
            not active
            or sub.rebalance_rule_id != rule.pk
            or sub.mode != rule.mode
            or sub.pinned_account_id != rule.pinned_account_id
        ):
            claim.append(sub.pk)

    now = timezone.now()
    # Count what was really inserted: rows skipped as conflicts belong to someone else.
    activated = services.rebalancer_subscriptions_create(rule=rule, tokens=create)
    activated += services.rebalancer_subscriptions_claim(rule=rule, subscription_ids=claim, now=now)
    retire = [
        sub.pk
        for sub in existing.values()
        if sub.rebalance_rule_id == rule.pk
        and sub.status == Subscription.Status.ACTIVE
        and sub.instrument_id not in keep
        and sub.instrument.expiry not in frozen_expiries
    ]
    deactivated = 0
    if retire:
        deactivated = services.rebalancer_subscriptions_retire(
            subscriptions=Subscription.objects.filter(pk__in=retire, rebalance_rule=rule),
            reason=f"outside the band of rule {rule.name}",
        )
    outcome.activated = activated
    outcome.deactivated = deactivated
    outcome.lines.append(f"subscribed {activated}, retired {deactivated}, rule streams {len(keep)}")
    if blocked_manual:
        outcome.lines.append(
            f"{blocked_manual} instrument(s) in the band have an inactive manual/API subscription: "
            "left alone"
        )
    if left_out:
        strikes = sorted({(t.expiry, t.strike) for t in left_out})
        sample = ", ".join(f"{e.isoformat()} {k:g}" for e, k in strikes[:10])
        outcome.lines.append(
            f"cannot fit {len(strikes)} strikes: capacity {capacity} on {capacity_text}, "
            f"{used_by_others} used by other subscriptions, {len(left_out)} instruments left out "
            f"({sample}{', ...' if len(strikes) > 10 else ''})"
        )
