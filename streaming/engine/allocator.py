"""Which account and which of its WebSocket connections streams each subscribed instrument.

``allocate`` is a pure function: the active subscriptions (with a pinned account, and where
they stream now), the accounts, and the previous allocation in, an :class:`Allocation` out.

Rules:
- a pinned subscription streams on its pinned account or nowhere, with the reason;
- the rest are balanced: an instrument stays on the account that streams it now while that
  account is streamable and has room; new or displaced instruments go to the account with the
  most free room (ties by account id), so a reload moves as few instruments as possible;
- at most ``max_connections`` connections of ``max_per_connection`` instruments per account
  (Kite: 3 x 3000); what does not fit is unassigned with the reason, never dropped silently;
- inside an account, an instrument stays on its connection while that connection is kept.

The result depends only on its inputs, so every runticker process computes the same
account-level allocation from the same database rows.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from streaming.kite.limits import MAX_CONNECTIONS_PER_API_KEY, MAX_INSTRUMENTS_PER_CONNECTION

REASON_NO_ACCOUNT = "no streamable account"


@dataclass(frozen=True, slots=True)
class SubscriptionWish:
    """One active subscription as the allocator sees it."""

    token: int
    mode: str
    pinned_account_id: int | None = None
    current_account_id: int | None = None
    """Where the database says it streams now: the allocation keeps it there if it can."""


@dataclass(frozen=True, slots=True)
class AccountInfo:
    """An account the allocator may use (``streamable``) or must explain (pinned, not usable)."""

    account_id: int
    label: str
    streamable: bool
    status: str = "active"


@dataclass
class Allocation:
    """Per account, per connection, token -> mode; and the unassigned tokens with reasons."""

    connections: dict[int, list[dict[int, str]]] = field(default_factory=dict)
    unassigned: dict[int, str] = field(default_factory=dict)
    account_of: dict[int, int] = field(default_factory=dict)
    """token -> account_id for every assigned token."""

    def tokens_of(self, account_id: int) -> dict[int, str]:
        """Every token -> mode the account streams, across its connections."""
        out: dict[int, str] = {}
        for conn in self.connections.get(account_id, ()):
            out.update(conn)
        return out

    def connection_of(self, token: int) -> tuple[int, int] | None:
        """(account_id, connection index) of a token, None if unassigned."""
        account_id = self.account_of.get(token)
        if account_id is None:
            return None
        for i, conn in enumerate(self.connections[account_id]):
            if token in conn:
                return account_id, i
        return None

    @property
    def assigned_count(self) -> int:
        return len(self.account_of)

    def mode_of(self, token: int) -> str | None:
        found = self.connection_of(token)
        if found is None:
            return None
        return self.connections[found[0]][found[1]][token]


def allocate(
    *,
    subscriptions: Sequence[SubscriptionWish],
    accounts: Iterable[AccountInfo],
    previous: Allocation | None = None,
    max_connections: int = MAX_CONNECTIONS_PER_API_KEY,
    max_per_connection: int = MAX_INSTRUMENTS_PER_CONNECTION,
) -> Allocation:
    """Allocate subscriptions to accounts and connections; see the module docstring."""
    by_id = {a.account_id: a for a in accounts}
    streamable = sorted(a.account_id for a in by_id.values() if a.streamable)
    capacity = max_connections * max_per_connection
    members: dict[int, list[SubscriptionWish]] = {aid: [] for aid in streamable}
    unassigned: dict[int, str] = {}

    # Sorting by token makes every tie-break below deterministic across processes.
    ordered = sorted(subscriptions, key=lambda s: s.token)

    # 1. Pinned subscriptions: their account or nowhere. Those already there go first.
    pinned = [s for s in ordered if s.pinned_account_id is not None]
    pinned.sort(key=lambda s: (s.current_account_id != s.pinned_account_id, s.token))
    for sub in pinned:
        account = by_id.get(sub.pinned_account_id)
        if account is None or not account.streamable:
            label = account.label if account else f"#{sub.pinned_account_id}"
            status = account.status if account else "missing"
            unassigned[sub.token] = f"pinned account {label} not streamable ({status})"
            continue
        bucket = members[account.account_id]
        if len(bucket) >= capacity:
            unassigned[sub.token] = (
                f"pinned account {account.label} full ({len(bucket)}/{capacity})"
            )
            continue
        bucket.append(sub)

    # 2. Unpinned ones that can stay where they stream now.
    movers: list[SubscriptionWish] = []
    for sub in ordered:
        if sub.pinned_account_id is not None:
            continue
        bucket = members.get(sub.current_account_id) if sub.current_account_id else None
        if bucket is not None and len(bucket) < capacity:
            bucket.append(sub)
        else:
            movers.append(sub)

    # 3. The rest to the account with the most room left.
    if movers:
        if not streamable:
            for sub in movers:
                unassigned[sub.token] = REASON_NO_ACCOUNT
        else:
            # A heap of (-room, account_id): the emptiest account, lowest id on ties.
            heap = [(-(capacity - len(members[aid])), aid) for aid in streamable]
            heapq.heapify(heap)
            for sub in movers:
                neg_room, target = heap[0]
                if neg_room >= 0:
                    total = capacity * len(streamable)
                    unassigned[sub.token] = f"all streamable accounts full ({total}/{total})"
                    continue
                members[target].append(sub)
                heapq.heapreplace(heap, (neg_room + 1, target))

    allocation = Allocation(unassigned=unassigned)
    for aid in streamable:
        subs = members[aid]
        if not subs:
            continue
        prev_conns = previous.connections.get(aid, []) if previous else []
        allocation.connections[aid] = _pack_connections(subs, prev_conns, max_per_connection)
        for sub in subs:
            allocation.account_of[sub.token] = aid
    return allocation


def _pack_connections(
    subs: Sequence[SubscriptionWish],
    previous: Sequence[Mapping[int, str]],
    max_per_connection: int,
) -> list[dict[int, str]]:
    """Spread one account's tokens over as few connections as hold them, keeping old places."""
    n_conn = math.ceil(len(subs) / max_per_connection)
    conns: list[dict[int, str]] = [{} for _ in range(n_conn)]
    was_on = {token: i for i, conn in enumerate(previous[:n_conn]) for token in conn}
    rest: list[SubscriptionWish] = []
    for sub in subs:
        i = was_on.get(sub.token)
        if i is not None and len(conns[i]) < max_per_connection:
            conns[i][sub.token] = sub.mode
        else:
            rest.append(sub)
    for sub in sorted(rest, key=lambda s: s.token):
        target = min(range(n_conn), key=lambda i: (len(conns[i]), i))
        conns[target][sub.token] = sub.mode
    return conns
