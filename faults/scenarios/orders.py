"""Orders through the deployment's HTTP API (daphne) to the simulated Kite, with Kite's
ambiguous failures, disordered postbacks and a runticker killed while orders change.

Two promises in each: **no duplicate order** (no tag twice at Kite, one stored order per
slice) and **no state going backwards** (every order's ``status_history``: status rank and
filled quantity never decrease, nothing after a terminal status); and the stored state ends
equal to Kite's.
"""

from __future__ import annotations

import secrets
import time
import urllib.error
import urllib.request
from collections import Counter
from typing import Any

import orjson

from faults.registry import Outcome, Promise, scenario
from faults.scenarios.streamkit import (
    account_ids_by_key,
    fresh_db,
    lease_holders,
    poll_until,
    rounded,
    streamed_keys,
)

DROPPED_ANSWERS = 10
#: ORDERS_UNKNOWN_GRACE_S is 60 s: an UNKNOWN order is settled by its update (at once) or, at
#: worst, from Kite's order book after the grace period.
SETTLE_DEADLINE_S = 150.0
DISORDERED_ORDERS = 5
LOTS_PER_ORDER = 3
#: After the replays of older states: this long for them to (not) change anything.
REPLAY_SETTLE_S = 5.0
RESTING_ORDERS = 5
POSTBACK_PATH = "/api/v1/kite/postback"


class _Desk:
    """The trader (faults-user, granted the account), its trade token, one option."""

    def __init__(self, dep, key: str) -> None:
        from django.contrib.auth import get_user_model

        from accounts.models import KiteAccount
        from subscriptions.models import Instrument

        fresh_db()
        self.dep = dep
        self.key = key
        self.account = KiteAccount.objects.get(pk=account_ids_by_key(dep)[key])
        self.account.traders.add(get_user_model().objects.get(username="faults-user"))
        self.token = dep.tokens["trade"]
        tokens = dep.chain["tokens"]
        self.option = (Instrument.objects.filter(instrument_token__in=tokens, instrument_type="CE")
                       .order_by("strike").first())
        self.placed_keys: set[str] = set()

    def body(self, **extra: Any) -> dict[str, Any]:
        return {"account_id": self.account.pk, "exchange": self.option.exchange,
                "tradingsymbol": self.option.tradingsymbol, "transaction_type": "BUY",
                "order_type": "MARKET", "quantity": self.option.lot_size, "product": "NRML", **extra}

    def call(self, method: str, path: str, body: dict | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict]:
        request = urllib.request.Request(
            f"{self.dep.http_url}{path}", method=method,
            data=None if body is None else orjson.dumps(body),
            headers={"Authorization": f"Token {self.token}", "Content-Type": "application/json",
                     **(headers or {})},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, orjson.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return exc.code, orjson.loads(raw or b"{}")
            except orjson.JSONDecodeError:
                return exc.code, {"raw": raw[:200].decode(errors="replace")}

    def place(self, body: dict[str, Any], *, idempotency_key: str | None = None) -> tuple[int, dict, str]:
        key = idempotency_key or secrets.token_hex(12)
        self.placed_keys.add(key)
        status, answer = self.call("POST", "/api/v1/orders", body, {"Idempotency-Key": key})
        return status, answer, key

    def orders(self) -> list:
        from accounts.models import Order

        fresh_db()
        return list(Order.objects.filter(account=self.account, placement__isnull=False,
                                         placement__idempotency_key__in=self.placed_keys))

    def sim_orders(self) -> list[dict[str, Any]]:
        tags = {o.tag for o in self.orders()}
        return [o for o in self.dep.sim("orders", self.key) if o.get("tag") in tags]


def _backwards(order) -> list[str]:
    """What in the order's status_history went backwards (empty: nothing)."""
    from accounts.order_models import TERMINAL_STATUSES
    from accounts.order_services import status_rank

    problems, rank, filled, terminal = [], -1, -1, False
    for entry in order.status_history:
        status, qty = entry["status"], entry.get("filled_quantity") or 0
        if terminal:
            problems.append(f"{status} after terminal")
        if status_rank(status) < rank:
            problems.append(f"{status} after rank {rank}")
        if qty < filled:
            problems.append(f"filled {qty} after {filled}")
        rank, filled = max(rank, status_rank(status)), max(filled, qty)
        terminal = terminal or status in TERMINAL_STATUSES
    return problems


def _checks(desk: _Desk) -> dict[str, Any]:
    """Duplicates, backwards moves and differences from Kite over the desk's orders."""
    orders = desk.orders()
    sim = desk.sim_orders()
    tag_counts = Counter(o["tag"] for o in sim)
    by_tag = {o["tag"]: o for o in sim}
    mismatched = [o.pk for o in orders
                  if o.tag not in by_tag or by_tag[o.tag]["status"] != o.status
                  or by_tag[o.tag]["filled_quantity"] != o.filled_quantity]
    backwards = {o.pk: _backwards(o) for o in orders}
    return {
        "orders": len(orders), "at_kite": len(sim),
        "duplicates": sum(n - 1 for n in tag_counts.values() if n > 1),
        "backwards": sum(bool(p) for p in backwards.values()),
        "backwards_detail": next((f"order {pk}: {p[0]}" for pk, p in backwards.items() if p), ""),
        "mismatched": len(mismatched),
        "statuses": dict(Counter(o.status for o in orders)),
    }


def _settled(desk: _Desk, expected: int) -> bool:
    checks = _checks(desk)
    return checks["orders"] == expected and checks["mismatched"] == 0


def _common_promises(checks: dict[str, Any], expected: int, settle_s: float | None) -> list[Promise]:
    return [
        Promise("no duplicate order at Kite", checks["duplicates"] == 0 and checks["at_kite"] == expected,
                f"{checks['at_kite']} at Kite for {expected} placed, {checks['duplicates']} duplicates"),
        Promise("one stored order per placement", checks["orders"] == expected, f"{checks['orders']}"),
        Promise("no state going backwards", checks["backwards"] == 0, checks["backwards_detail"]),
        Promise("every order ends as Kite has it", settle_s is not None and checks["mismatched"] == 0,
                f"{checks['mismatched']} differ: {checks['statuses']}"),
    ]


@scenario("orders.dropped_response", group="orders")
def orders_dropped_response(dep) -> Outcome:
    """Kite takes 10 orders and drops each answer (the connection closes before the reply):
    each is UNKNOWN, then settled once; a client retry with the same key sends nothing."""
    key = streamed_keys(dep)[0]
    desk = _Desk(dep, key)
    dep.sim("set_postback_url", key, None)
    dep.sim("drop_response_next", "order.place", times=DROPPED_ANSWERS)
    answers: Counter = Counter()
    first: tuple[dict, str] | None = None
    first_status = 0
    began = time.monotonic()
    for _ in range(DROPPED_ANSWERS):
        body = desk.body()
        status, _answer, idem = desk.place(body)
        answers[status] += 1
        if first is None:
            first, first_status = (body, idem), status
    retry_status, _, _ = desk.place(first[0], idempotency_key=first[1])
    settle = poll_until(lambda: _settled(desk, DROPPED_ANSWERS), timeout_s=SETTLE_DEADLINE_S,
                        interval_s=0.25)
    settle_s = None if settle is None else time.monotonic() - began
    checks = _checks(desk)
    dropped = dep.simulator.responses_dropped
    return Outcome(
        figures={"placed": DROPPED_ANSWERS, "answers": dict(answers), "retry_answer": retry_status,
                 "answers_dropped_total": dropped, "settled_s": rounded(settle_s),
                 "at_kite": checks["at_kite"], "duplicates": checks["duplicates"],
                 "backwards": checks["backwards"], "statuses": checks["statuses"]},
        promises=[
            # 202 while the order is UNKNOWN; 201 when its update (with the tag) came in first.
            Promise("every lost answer is a 202 or 201, never an error",
                    sum(answers[s] for s in (201, 202)) == DROPPED_ANSWERS, f"{dict(answers)}"),
            Promise("a retry with the same Idempotency-Key returns the stored answer",
                    retry_status == first_status, f"{retry_status} (first {first_status})"),
            *_common_promises(checks, DROPPED_ANSWERS, settle_s),
        ],
    )


@scenario("orders.postback_disorder", group="orders")
def orders_postback_disorder(dep) -> Outcome:
    """Orders filled in 3 parts with every postback sent twice and each pair swapped, then
    older states replayed on the ticker and as postbacks: nothing goes backwards."""
    key = streamed_keys(dep)[0]
    desk = _Desk(dep, key)
    dep.sim("set_postback_url", key, f"{dep.http_url}{POSTBACK_PATH}")
    dep.sim("disorder_postbacks", key)
    sim = dep.simulator
    posted0 = len(sim.postbacks)
    sim.max_fill_quantity = desk.option.lot_size  # one lot a market step: 3 updates an order
    try:
        began = time.monotonic()
        answers: Counter = Counter()
        for _ in range(DISORDERED_ORDERS):
            status, _answer, _key = desk.place(desk.body(quantity=desk.option.lot_size * LOTS_PER_ORDER))
            answers[status] += 1
        settle = poll_until(lambda: _settled(desk, DISORDERED_ORDERS), timeout_s=SETTLE_DEADLINE_S,
                            interval_s=0.25)
        settle_s = None if settle is None else time.monotonic() - began
        poll_until(lambda: not sim._held_postback, timeout_s=5)  # the last held one went out
        for order in desk.sim_orders():  # older states again: ticker frames and postbacks
            for index in (1, 2):
                dep.sim("replay_order_update", key, order["order_id"], index=index)
        time.sleep(REPLAY_SETTLE_S)  # an observation window: the replays must change nothing
    finally:
        sim.max_fill_quantity = None
        dep.sim("disorder_postbacks", key, enabled=False)
        dep.sim("set_postback_url", key, None)
    posts = sim.postbacks[posted0:]
    refused = sum(p["http_status"] != 200 for p in posts)
    checks = _checks(desk)
    return Outcome(
        figures={"orders": DISORDERED_ORDERS, "fills_each": LOTS_PER_ORDER, "postbacks": len(posts),
                 "postbacks_not_200": refused, "settled_s": rounded(settle_s),
                 "duplicates": checks["duplicates"], "backwards": checks["backwards"],
                 "mismatched": checks["mismatched"], "statuses": checks["statuses"]},
        promises=[
            Promise("every order placed (201)", answers == {201: DISORDERED_ORDERS}, f"{dict(answers)}"),
            Promise("every postback answered 200 (duplicates and old ones are no error)", refused == 0,
                    f"{refused} of {len(posts)}"),
            *_common_promises(checks, DISORDERED_ORDERS, settle_s),
        ],
    )


@scenario("orders.runticker_restart", group="orders")
def orders_runticker_restart(dep) -> Outcome:
    """Resting orders are modified to fill while the runticker that relays the account's
    order updates is killed (-9) and restarted: the updates it missed are repaired (the
    sync on reconnect), with no duplicate and nothing backwards."""
    from accounts.order_models import OPEN_STATUSES, OrderSyncRun

    key = streamed_keys(dep)[0]
    desk = _Desk(dep, key)
    dep.sim("set_postback_url", key, None)  # the ticker socket and the sync only
    answers: Counter = Counter()
    for _ in range(RESTING_ORDERS):
        status, _answer, _key = desk.place(desk.body(order_type="LIMIT", price=0.05))
        answers[status] += 1
    resting_s = poll_until(lambda: all(o.status in OPEN_STATUSES for o in desk.orders())
                           and len(desk.orders()) == RESTING_ORDERS, timeout_s=60, interval_s=0.25)
    fresh_db()
    syncs0 = OrderSyncRun.objects.filter(account=desk.account).count()
    victim = lease_holders(dep)[key]
    dep.probe.mark(f"orders: kill -9 {victim}")
    began = time.monotonic()
    dep.procs[victim].kill9()
    modified: Counter = Counter()
    for order in desk.orders():
        status, _ = desk.call("PATCH", f"/api/v1/orders/{order.pk}", {"order_type": "MARKET"})
        modified[status] += 1
    dep.procs[victim].start()
    settle = poll_until(lambda: _settled(desk, RESTING_ORDERS), timeout_s=SETTLE_DEADLINE_S,
                        interval_s=0.25)
    settle_s = None if settle is None else time.monotonic() - began
    checks = _checks(desk)
    fresh_db()
    syncs = OrderSyncRun.objects.filter(account=desk.account).count() - syncs0
    return Outcome(
        figures={"orders": RESTING_ORDERS, "resting_s": rounded(resting_s),
                 "modify_answers": dict(modified), "settled_s": rounded(settle_s), "syncs": syncs,
                 "duplicates": checks["duplicates"], "backwards": checks["backwards"],
                 "mismatched": checks["mismatched"], "statuses": checks["statuses"]},
        promises=[
            Promise("every order placed and resting", answers == {201: RESTING_ORDERS}
                    and resting_s is not None, f"{dict(answers)}"),
            Promise("every modification accepted", modified == {200: RESTING_ORDERS}, f"{dict(modified)}"),
            *_common_promises(checks, RESTING_ORDERS, settle_s),
        ],
    )
