"""Writes to subscriptions. Every write tells the running engines to reload after commit."""

import dataclasses
import datetime as dt
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import structlog
from django.db import transaction
from django.db.models import Count, Q, QuerySet
from django.utils import timezone

from accounts.models import KiteAccount
from streaming.control import notify_engines_on_commit
from streaming.greeks import IST
from streaming.kite.limits import MAX_INSTRUMENTS_PER_API_KEY
from streaming.kite.schemas import INSTRUMENT_CSV_COLUMNS
from subscriptions.models import Instrument, RebalanceRule, Subscription

if TYPE_CHECKING:
    from streaming.kite.schemas import InstrumentRow

log = structlog.get_logger(__name__)


@transaction.atomic
def subscription_activate(
    *,
    instrument: Instrument,
    mode: str = Subscription.Mode.FULL,
    source: str = Subscription.Source.MANUAL,
    pinned_account=None,
    rule: RebalanceRule | None = None,
) -> Subscription:
    """Subscribe an instrument (create or reactivate its one subscription)."""
    subscription, created = Subscription.objects.select_for_update().get_or_create(
        instrument=instrument,
        defaults={
            "mode": mode,
            "source": source,
            "pinned_account": pinned_account,
            "rebalance_rule": rule,
            "status": Subscription.Status.ACTIVE,
        },
    )
    if not created:
        subscription.mode = mode
        subscription.status = Subscription.Status.ACTIVE
        subscription.status_reason = ""
        subscription.source = source
        subscription.rebalance_rule = rule
        subscription.pinned_account = pinned_account
        subscription.save()
    notify_engines_on_commit()
    log.info("subscription.activated", instrument_token=instrument.pk, mode=mode, source=source)
    return subscription


class ChainWithoutStrikes(ValueError):
    """The registry has no options of that underlying and expiry."""


@transaction.atomic
def subscriptions_activate_chain(
    *,
    underlying: str,
    expiries: Iterable[dt.date],
    around_price: float,
    strikes_each_side: int,
    mode: str = Subscription.Mode.FULL,
) -> list[Subscription]:
    """Subscribe the calls and puts of ``strikes_each_side`` strikes either side of the strike
    nearest ``around_price`` (and that strike), for each expiry; one transaction."""
    activated: list[Subscription] = []
    for expiry in expiries:
        chain = list(
            Instrument.objects.filter(
                name=underlying,
                expiry=expiry,
                instrument_type__in=[Instrument.Type.CALL, Instrument.Type.PUT],
            ).order_by("strike", "instrument_type")
        )
        strikes = sorted({i.strike for i in chain})
        if not strikes:
            raise ChainWithoutStrikes(f"no {underlying} options expiring {expiry:%Y-%m-%d} in the registry")
        atm = min(range(len(strikes)), key=lambda k: abs(strikes[k] - around_price))
        window = set(strikes[max(0, atm - strikes_each_side) : atm + strikes_each_side + 1])
        activated.extend(
            subscription_activate(instrument=instrument, mode=mode, source=Subscription.Source.MANUAL)
            for instrument in chain
            if instrument.strike in window
        )
    return activated


def subscriptions_set_status(*, subscription_ids: Iterable[int], status: str, reason: str = "") -> int:
    """Activate or deactivate many subscriptions in one UPDATE; returns how many changed."""
    with transaction.atomic():
        changed = (
            Subscription.objects.filter(pk__in=list(subscription_ids))
            .exclude(status=status)
            .update(status=status, status_reason=reason, updated_at=timezone.now())
        )
        if changed:
            notify_engines_on_commit()
    log.info("subscriptions.status_set", status=status, count=changed, reason=reason)
    return changed


def subscription_deactivate(*, subscription: Subscription, reason: str) -> bool:
    return bool(
        subscriptions_set_status(
            subscription_ids=[subscription.pk], status=Subscription.Status.INACTIVE, reason=reason
        )
    )


def subscription_set_mode(*, subscription: Subscription, mode: str) -> None:
    with transaction.atomic():
        Subscription.objects.filter(pk=subscription.pk).update(mode=mode, updated_at=timezone.now())
        notify_engines_on_commit()


def subscription_save(*, subscription: Subscription) -> Subscription:
    """Save a subscription edited by hand (the admin's form); the engines are told."""
    with transaction.atomic():
        subscription.save()
        notify_engines_on_commit()
    return subscription


def subscriptions_delete(*, subscription_ids: Iterable[int]) -> int:
    """Delete subscriptions; returns how many were deleted."""
    with transaction.atomic():
        deleted, _ = Subscription.objects.filter(pk__in=list(subscription_ids)).delete()
        if deleted:
            notify_engines_on_commit()
    log.info("subscriptions.deleted", count=deleted)
    return deleted


def engines_reload(*, reason: str) -> None:
    """Ask the engines to reload after commit though nothing was written here (drift repair)."""
    log.info("engines.reload_requested", reason=reason)
    notify_engines_on_commit()


# --- the rebalancer's writes (its rule's subscriptions only) --------------------------------


def rebalancer_subscriptions_create(*, rule: RebalanceRule, tokens: Sequence[int]) -> int:
    """Subscribe ``tokens`` for ``rule``; returns how many rows are the rule's afterwards.

    ``ignore_conflicts``: an instrument subscribed by someone else since the rule's read is
    covered, and not counted.
    """
    if not tokens:
        return 0
    Subscription.objects.bulk_create(
        [
            Subscription(
                instrument_id=token, mode=rule.mode, status=Subscription.Status.ACTIVE,
                source=Subscription.Source.REBALANCER, rebalance_rule=rule,
                pinned_account_id=rule.pinned_account_id,
            )
            for token in tokens
        ],
        ignore_conflicts=True,
    )  # fmt: skip
    created = Subscription.objects.filter(instrument_id__in=tokens, rebalance_rule=rule).count()
    if created:
        notify_engines_on_commit()
    return created


def rebalancer_subscriptions_claim(
    *, rule: RebalanceRule, subscription_ids: Sequence[int], now: dt.datetime
) -> int:
    """(Re)activate rebalancer rows as ``rule``'s, in its mode and pin; returns how many."""
    if not subscription_ids:
        return 0
    claimed = (
        Subscription.objects.filter(pk__in=subscription_ids, source=Subscription.Source.REBALANCER)
        .filter(Q(rebalance_rule=rule) | Q(rebalance_rule__isnull=True)
                | Q(status=Subscription.Status.INACTIVE))
        .update(status=Subscription.Status.ACTIVE, status_reason="", rebalance_rule=rule,
                mode=rule.mode, pinned_account_id=rule.pinned_account_id, updated_at=now)
    )  # fmt: skip
    if claimed:
        notify_engines_on_commit()
    return claimed


def rebalancer_subscriptions_retire(*, subscriptions: QuerySet[Subscription], reason: str) -> int:
    """Deactivate the active rebalancer rows among ``subscriptions``; returns how many."""
    retired = subscriptions.filter(
        status=Subscription.Status.ACTIVE, source=Subscription.Source.REBALANCER
    ).update(status=Subscription.Status.INACTIVE, status_reason=reason[:200], updated_at=timezone.now())
    if retired:
        notify_engines_on_commit()
    return retired


# --- the engine's allocation ----------------------------------------------------------------


def subscriptions_save_assignments(
    *, groups: Mapping[tuple[int | None, str, str], Sequence[int]], chunk: int
) -> int:
    """Write where subscriptions stream (account, mode, or why not), one UPDATE per group.

    The engine's own write after an allocation, so it tells no engine. One transaction, so
    the admin never sees half an allocation; a fixed order (groups by key, ids ascending), so
    two engines writing at once lock rows in the same order instead of deadlocking. An
    inactive subscription streams nowhere: what an engine wrote about it is cleared.
    """
    changed = 0
    with transaction.atomic():
        for (account_id, mode, reason), pks in sorted(
            groups.items(), key=lambda item: (item[0][0] or 0, item[0][1], item[0][2])
        ):
            ordered = sorted(pks)
            for start in range(0, len(ordered), chunk):
                changed += Subscription.objects.filter(pk__in=ordered[start : start + chunk]).update(
                    assigned_account_id=account_id, streamed_mode=mode, unassigned_reason=reason
                )
        changed += (
            Subscription.objects.exclude(status=Subscription.Status.ACTIVE)
            .exclude(assigned_account=None, streamed_mode="", unassigned_reason="")
            .update(assigned_account=None, streamed_mode="", unassigned_reason="")
        )
    return changed


# --- many at once, with admission (the HTTP API) ---------------------------------------------


@dataclass(frozen=True, slots=True)
class AdmissionRefusal:
    """Why one instrument of a request cannot be streamed."""

    instrument_token: int
    reason: str


class SubscriptionAdmissionError(Exception):
    """The request does not fit the accounts' capacity; nothing was changed."""

    def __init__(self, refusals: list[AdmissionRefusal], *, summary: str) -> None:
        super().__init__(summary)
        self.refusals = refusals
        self.summary = summary


def _admit(*, new_tokens: list[int], pinned_account) -> None:
    """Refuse (raise) unless ``new_tokens`` fit Kite's per-key capacity on the accounts.

    Each account that can stream (not disabled, not in error) holds at most
    ``MAX_INSTRUMENTS_PER_API_KEY`` instruments; pinned subscriptions fill their own account,
    the others share what is left. The accounts are locked, so two requests cannot both take
    the last room.
    """
    accounts = list(
        KiteAccount.objects.select_for_update()
        .exclude(status__in=[KiteAccount.Status.DISABLED, KiteAccount.Status.ERROR])
        .order_by("pk")
        .values_list("pk", "label")
    )
    active = Subscription.objects.filter(status=Subscription.Status.ACTIVE)
    pinned_load = dict(
        active.filter(pinned_account__isnull=False)
        .values("pinned_account")
        .annotate(n=Count("pk"))
        .values_list("pinned_account", "n")
    )
    unpinned_load = active.filter(pinned_account__isnull=True).count()
    if pinned_account is not None:
        held = pinned_load.get(pinned_account.pk, 0)
        usable = pinned_account.pk in {pk for pk, _ in accounts}
        room = MAX_INSTRUMENTS_PER_API_KEY - held if usable else 0
        why = (
            f"account {pinned_account.label} holds {held} of {MAX_INSTRUMENTS_PER_API_KEY} instruments"
            if usable else f"account {pinned_account.label} is {pinned_account.status}: it streams nothing"
        )  # fmt: skip
    else:
        room = sum(max(0, MAX_INSTRUMENTS_PER_API_KEY - pinned_load.get(pk, 0)) for pk, _ in accounts)
        room -= unpinned_load
        why = (
            f"{len(accounts)} account(s) can stream {len(accounts) * MAX_INSTRUMENTS_PER_API_KEY} "
            f"instruments ({MAX_INSTRUMENTS_PER_API_KEY} per api key); "
            f"{unpinned_load + sum(pinned_load.values())} are subscribed"
        )
    room = max(0, room)
    if len(new_tokens) <= room:
        return
    overflow = new_tokens[room:]
    raise SubscriptionAdmissionError(
        [AdmissionRefusal(token, f"no capacity: {why}") for token in overflow],
        summary=f"{len(overflow)} of {len(new_tokens)} new instruments do not fit: {why}",
    )


def subscriptions_activate_many(
    *,
    instruments: Sequence[Instrument],
    mode: str,
    source: str = Subscription.Source.API,
    pinned_account=None,
) -> list[Subscription]:
    """Subscribe many instruments in one transaction, all or none, with one engine notice.

    Instruments already streamed take the new mode, source and pin; the new ones must fit the
    accounts' capacity, else :class:`SubscriptionAdmissionError` lists each one that does not.
    """
    tokens = list(dict.fromkeys(i.pk for i in instruments))
    with transaction.atomic():
        already = set(
            Subscription.objects.filter(
                instrument_id__in=tokens, status=Subscription.Status.ACTIVE
            ).values_list("instrument_id", flat=True)
        )
        _admit(new_tokens=[t for t in tokens if t not in already], pinned_account=pinned_account)
        now = timezone.now()
        rows = [
            Subscription(
                instrument_id=token, mode=mode, status=Subscription.Status.ACTIVE, status_reason="",
                source=source, pinned_account=pinned_account, rebalance_rule=None,
                created_at=now, updated_at=now,
            )
            for token in tokens
        ]  # fmt: skip
        Subscription.objects.bulk_create(
            rows,
            batch_size=1000,
            update_conflicts=True,
            unique_fields=["instrument"],
            update_fields=[
                "mode", "status", "status_reason", "source", "pinned_account", "rebalance_rule",
                "updated_at",
            ],
        )  # fmt: skip
        notify_engines_on_commit()
    log.info("subscriptions.activated_many", count=len(tokens), new=len(tokens) - len(already),
             mode=mode, source=source)  # fmt: skip
    return list(Subscription.objects.filter(instrument_id__in=tokens).select_related("instrument"))


# --- instrument registry refresh (Kite's daily dump) ----------------------------------------

INSTRUMENT_FIELDS = tuple(c for c in INSTRUMENT_CSV_COLUMNS if c != "instrument_token")
"""The columns the dump sets besides the key, in the order rows are compared."""

INSTRUMENT_REFRESH_BATCH_SIZE = 2000
"""Rows per INSERT … ON CONFLICT statement: 12 columns stay far below PostgreSQL's 65535
parameters, and Django lowers it further on SQLite."""

INSTRUMENT_REFRESH_MIN_KEEP_RATIO = 0.5
"""A dump with fewer than half the rows we hold for an exchange is refused (unless forced):
a truncated or partial download would otherwise delete half the registry."""



class InstrumentSource(Protocol):
    """What the refresh needs of the REST client: KiteRestClient.instruments."""

    def instruments(self, exchange: str | None = None) -> list["InstrumentRow"]: ...


class InstrumentDumpSuspicious(ValueError):
    """The dump is much smaller than what we hold; nothing was changed."""


@dataclass(frozen=True, slots=True)
class InstrumentRefreshResult:
    """What one refresh did; every count is of instruments unless it says subscriptions."""

    fetched: int
    created: int
    updated: int
    unchanged: int
    reassigned: int
    """Tokens Kite now uses for another contract, or symbols that moved to a new token."""
    deleted: int
    """No longer in the dump and referenced by nothing: removed."""
    kept_delisted: int
    """No longer in the dump but referenced (a subscription, history): kept."""
    subscriptions_deactivated: int
    duration_s: float

    def summary(self) -> str:
        return (
            f"fetched {self.fetched}: created {self.created}, updated {self.updated}, "
            f"unchanged {self.unchanged}, reassigned {self.reassigned}, deleted {self.deleted}, "
            f"kept delisted {self.kept_delisted}; subscriptions deactivated "
            f"{self.subscriptions_deactivated} ({self.duration_s:.1f} s)"
        )


def _instrument_label(exchange: str, tradingsymbol: str) -> str:
    return f"{exchange}:{tradingsymbol}"


def _referenced_instrument_tokens(tokens: list[int]) -> set[int]:
    """Tokens among ``tokens`` that any model points at (subscriptions, history, bars)."""
    referenced: set[int] = set()
    # Hidden reverse relations (related_name="+") count too: history rows point here.
    relations = [
        f for f in Instrument._meta.get_fields(include_hidden=True)
        if f.is_relation and f.auto_created and not f.concrete
    ]
    for relation in relations:
        field = relation.field
        for start in range(0, len(tokens), 10_000):
            chunk = tokens[start : start + 10_000]
            referenced.update(
                relation.related_model._base_manager.filter(**{f"{field.name}__in": chunk})
                .values_list(field.attname, flat=True)
                .distinct()
            )
    return referenced


def _deactivate_with_reasons(reasons: dict[int, str]) -> int:
    """Deactivate active subscriptions of instruments, one UPDATE per distinct reason."""
    by_reason: dict[str, list[int]] = {}
    active = Subscription.objects.filter(
        status=Subscription.Status.ACTIVE, instrument_id__in=list(reasons)
    ).values_list("pk", "instrument_id")
    for pk, token in active:
        by_reason.setdefault(reasons[token], []).append(pk)
    return sum(
        subscriptions_set_status(subscription_ids=ids, status=Subscription.Status.INACTIVE, reason=reason)
        for reason, ids in by_reason.items()
    )


def subscriptions_deactivate_expired(*, today: dt.date) -> int:
    """Deactivate active subscriptions whose instrument expired before ``today`` (IST)."""
    expired = (
        Subscription.objects.filter(status=Subscription.Status.ACTIVE, instrument__expiry__lt=today)
        .values_list("pk", "instrument__expiry")
    )
    by_expiry: dict[dt.date, list[int]] = {}
    for pk, expiry in expired:
        by_expiry.setdefault(expiry, []).append(pk)
    return sum(
        subscriptions_set_status(
            subscription_ids=ids, status=Subscription.Status.INACTIVE,
            reason=f"instrument expired on {expiry.isoformat()}",
        )
        for expiry, ids in sorted(by_expiry.items())
    )


def instruments_refresh(
    *,
    client: InstrumentSource,
    exchanges: Sequence[str] | None = None,
    batch_size: int = INSTRUMENT_REFRESH_BATCH_SIZE,
    today: dt.date | None = None,
    force: bool = False,
) -> InstrumentRefreshResult:
    """Bring the Instrument registry in line with Kite's dump (all exchanges, or some).

    The dump is downloaded and validated whole before anything is written, then applied in
    one transaction: new and changed rows are upserted in batches, rows Kite no longer lists
    are deleted unless something references them, and subscriptions are deactivated with a
    reason when their instrument expired (before ``today``, IST), left the dump, or its token
    now denotes another contract (Kite reuses tokens). A symbol that moved to a new token is
    renamed out of the way first, since (exchange, tradingsymbol) is unique.
    """
    started = time.monotonic()
    today = today or dt.datetime.now(IST).date()
    rows = []
    for exchange in exchanges or [None]:
        rows.extend(client.instruments(exchange))
    dump = {row.instrument_token: row for row in rows}
    if len(dump) != len(rows):
        raise InstrumentDumpSuspicious("the exchanges' dumps repeat an instrument_token")
    in_scope = set(exchanges) if exchanges else None

    with transaction.atomic():
        existing = {
            token: values
            for token, *values in Instrument.objects.values_list(
                "instrument_token", *INSTRUMENT_FIELDS
            ).iterator(chunk_size=10_000)
        }
        symbol_at = {(v[-1], v[1]): token for token, v in existing.items()}
        scope_tokens = [
            token for token, v in existing.items() if in_scope is None or v[-1] in in_scope
        ]
        if not force:
            _check_dump_size(rows, existing, scope_tokens)

        to_write: list[Instrument] = []
        created = unchanged = 0
        reasons: dict[int, str] = {}
        move_aside: set[int] = set()
        for token, row in dump.items():
            values = tuple(getattr(row, name) for name in INSTRUMENT_FIELDS)
            old = existing.get(token)
            if old is None:
                created += 1
            elif tuple(old) == values:
                unchanged += 1
                continue
            elif (old[-1], old[1]) != (row.exchange, row.tradingsymbol):
                reasons[token] = (
                    f"instrument token {token} now denotes "
                    f"{_instrument_label(row.exchange, row.tradingsymbol)} "
                    f"(was {_instrument_label(old[-1], old[1])})"
                )
                move_aside.add(token)
            holder = symbol_at.get((row.exchange, row.tradingsymbol))
            if holder is not None and holder != token:
                move_aside.add(holder)
                reasons.setdefault(
                    holder,
                    f"{_instrument_label(row.exchange, row.tradingsymbol)} moved from token "
                    f"{holder} to {token}",
                )
            to_write.append(Instrument(instrument_token=token, **dict(zip(INSTRUMENT_FIELDS, values, strict=True))))

        # Free the (exchange, tradingsymbol) pairs the upsert is about to take: PostgreSQL
        # checks the unique constraint row by row, not at the end of the statement.
        for token in move_aside:
            old = existing[token]
            Instrument.objects.filter(pk=token).update(tradingsymbol=f"{old[1][:40]}~{token}")
        Instrument.objects.bulk_create(
            to_write,
            batch_size=batch_size,
            update_conflicts=True,
            unique_fields=["instrument_token"],
            update_fields=[*INSTRUMENT_FIELDS, "updated_at"],
        )

        gone = [token for token in scope_tokens if token not in dump]
        referenced = _referenced_instrument_tokens(gone)
        deletable = [token for token in gone if token not in referenced]
        for start in range(0, len(deletable), batch_size):
            Instrument.objects.filter(pk__in=deletable[start : start + batch_size]).delete()
        for token in referenced:
            old = existing[token]
            reasons.setdefault(
                token, f"instrument {_instrument_label(old[-1], old[1])} is no longer listed by Kite"
            )

        deactivated = subscriptions_deactivate_expired(today=today)
        deactivated += _deactivate_with_reasons(reasons)
        updated = len(to_write) - created
        if updated or reasons:
            notify_engines_on_commit()

    result = InstrumentRefreshResult(
        fetched=len(rows),
        created=created,
        updated=updated,
        unchanged=unchanged,
        reassigned=len(move_aside),
        deleted=len(deletable),
        kept_delisted=len(referenced),
        subscriptions_deactivated=deactivated,
        duration_s=time.monotonic() - started,
    )
    log.info("instruments.refreshed", exchanges=list(exchanges or []), **dataclasses.asdict(result))
    return result


def _check_dump_size(
    rows: Sequence["InstrumentRow"], existing: dict[int, list], scope_tokens: list[int]
) -> None:
    held: dict[str, int] = {}
    for token in scope_tokens:
        exchange = existing[token][-1]
        held[exchange] = held.get(exchange, 0) + 1
    fetched: dict[str, int] = {}
    for row in rows:
        fetched[row.exchange] = fetched.get(row.exchange, 0) + 1
    for exchange, count in sorted(held.items()):
        got = fetched.get(exchange, 0)
        if got < count * INSTRUMENT_REFRESH_MIN_KEEP_RATIO:
            raise InstrumentDumpSuspicious(
                f"Kite's dump lists {got} {exchange} instruments, we hold {count}: refusing to "
                f"apply a dump under {INSTRUMENT_REFRESH_MIN_KEEP_RATIO:.0%} of the registry "
                "(force to apply it anyway)"
            )
