"""The allocator: pinned accounts respected, the rest balanced, limits kept, reasons given,
and reloads that move as few instruments as possible."""

from collections import Counter

import pytest

from streaming.engine.allocator import (
    REASON_NO_ACCOUNT,
    AccountInfo,
    SubscriptionWish,
    allocate,
)
from streaming.kite.limits import MAX_INSTRUMENTS_PER_API_KEY, MAX_INSTRUMENTS_PER_CONNECTION

A1 = AccountInfo(account_id=1, label="acc1", streamable=True)
A2 = AccountInfo(account_id=2, label="acc2", streamable=True)
A3 = AccountInfo(account_id=3, label="acc3", streamable=True)
EXPIRED = AccountInfo(account_id=9, label="acc9", streamable=False, status="session_expired")


def wishes(tokens, *, mode="full", pinned=None, current=None):
    return [
        SubscriptionWish(token=t, mode=mode, pinned_account_id=pinned, current_account_id=current)
        for t in tokens
    ]


def check_limits(allocation, *, max_connections=3, max_per_connection=MAX_INSTRUMENTS_PER_CONNECTION):
    seen = set()
    for conns in allocation.connections.values():
        assert len(conns) <= max_connections
        for conn in conns:
            assert 0 < len(conn) <= max_per_connection
            assert not seen & conn.keys(), "a token on two connections"
            seen |= conn.keys()
    assert seen == set(allocation.account_of)
    assert not seen & set(allocation.unassigned)


def test_unpinned_subscriptions_are_balanced_across_accounts():
    alloc = allocate(subscriptions=wishes(range(1, 3001)), accounts=[A1, A2, A3])
    counts = Counter(alloc.account_of.values())
    assert counts == {1: 1000, 2: 1000, 3: 1000}
    assert not alloc.unassigned
    check_limits(alloc)


def test_pinned_subscription_stays_on_its_account_even_when_unbalanced():
    subs = wishes(range(1, 101), pinned=2) + wishes(range(101, 111))
    alloc = allocate(subscriptions=subs, accounts=[A1, A2])
    assert all(alloc.account_of[t] == 2 for t in range(1, 101))
    # The unpinned ten go to the emptier account.
    assert all(alloc.account_of[t] == 1 for t in range(101, 111))


def test_pinned_to_an_unstreamable_account_is_unassigned_with_the_reason():
    subs = wishes([5], pinned=9) + wishes([6])
    alloc = allocate(subscriptions=subs, accounts=[A1, EXPIRED])
    assert alloc.unassigned == {5: "pinned account acc9 not streamable (session_expired)"}
    assert alloc.account_of == {6: 1}


def test_no_account_at_all():
    alloc = allocate(subscriptions=wishes([1, 2]), accounts=[EXPIRED])
    assert alloc.unassigned == {1: REASON_NO_ACCOUNT, 2: REASON_NO_ACCOUNT}
    assert alloc.connections == {}


def test_account_at_kite_maximum_uses_three_connections_of_3000():
    alloc = allocate(subscriptions=wishes(range(1, 9001)), accounts=[A1])
    assert [len(c) for c in alloc.connections[1]] == [3000, 3000, 3000]
    assert not alloc.unassigned
    check_limits(alloc)


def test_what_does_not_fit_is_unassigned_never_dropped():
    n = MAX_INSTRUMENTS_PER_API_KEY * 2 + 5
    subs = wishes(range(1, n + 1))
    alloc = allocate(subscriptions=subs, accounts=[A1, A2])
    assert alloc.assigned_count == MAX_INSTRUMENTS_PER_API_KEY * 2
    assert len(alloc.unassigned) == 5
    assert set(alloc.unassigned.values()) == {"all streamable accounts full (18000/18000)"}
    assert alloc.assigned_count + len(alloc.unassigned) == n
    check_limits(alloc)


def test_pinned_overflow_names_the_full_account():
    subs = wishes(range(1, 12), pinned=1)
    alloc = allocate(subscriptions=subs, accounts=[A1, A2], max_connections=2, max_per_connection=5)
    assert alloc.assigned_count == 10
    assert alloc.unassigned == {11: "pinned account acc1 full (10/10)"}


def test_pinned_ones_already_streaming_keep_their_place_over_new_pins():
    # Account 1 holds 10; tokens 1..5 stream there now, 6..15 are newly pinned.
    subs = wishes(range(6, 16), pinned=1) + wishes(range(1, 6), pinned=1, current=1)
    alloc = allocate(subscriptions=subs, accounts=[A1], max_connections=2, max_per_connection=5)
    assert all(alloc.account_of.get(t) == 1 for t in range(1, 6))
    assert len(alloc.unassigned) == 5


def test_existing_assignments_are_kept_when_a_new_account_appears():
    first = allocate(subscriptions=wishes(range(1, 1001)), accounts=[A1])
    subs = [
        SubscriptionWish(token=t, mode="full", current_account_id=first.account_of[t])
        for t in range(1, 1001)
    ] + wishes(range(1001, 1101))
    second = allocate(subscriptions=subs, accounts=[A1, A2], previous=first)
    assert all(second.account_of[t] == 1 for t in range(1, 1001))
    # New ones go to the empty account.
    assert all(second.account_of[t] == 2 for t in range(1001, 1101))


def test_reload_keeps_tokens_on_their_connection():
    first = allocate(subscriptions=wishes(range(1, 7001)), accounts=[A1])
    conn_of = {t: first.connection_of(t) for t in range(1, 7001)}
    # Remove 500 tokens from connection 0, add 400 new ones, change a mode.
    removed = set(list(first.connections[1][0])[:500])
    subs = [
        SubscriptionWish(token=t, mode="ltp" if t == 6999 else "full", current_account_id=1)
        for t in range(1, 7001)
        if t not in removed
    ] + wishes(range(10_001, 10_401))
    second = allocate(subscriptions=subs, accounts=[A1], previous=first)
    moved = [t for t in range(1, 7001) if t not in removed and second.connection_of(t) != conn_of[t]]
    assert moved == []
    assert second.mode_of(6999) == "ltp"
    check_limits(second)


def test_an_account_becoming_unstreamable_releases_its_instruments_to_others():
    first = allocate(subscriptions=wishes(range(1, 101)), accounts=[A1, A2])
    on_1 = [t for t, a in first.account_of.items() if a == 1]
    subs = [
        SubscriptionWish(token=t, mode="full", current_account_id=a)
        for t, a in first.account_of.items()
    ]
    a1_expired = AccountInfo(account_id=1, label="acc1", streamable=False, status="session_expired")
    second = allocate(subscriptions=subs, accounts=[a1_expired, A2], previous=first)
    assert all(second.account_of[t] == 2 for t in on_1)
    assert second.assigned_count == 100


def test_allocation_is_deterministic_whatever_the_input_order():
    subs = wishes(range(1, 500)) + wishes(range(500, 600), pinned=3)
    a = allocate(subscriptions=subs, accounts=[A1, A2, A3])
    b = allocate(subscriptions=list(reversed(subs)), accounts=[A3, A1, A2])
    assert a.account_of == b.account_of
    assert a.connections == b.connections


@pytest.mark.parametrize("n_accounts", [1, 11])
def test_scale_100k(n_accounts):
    accounts = [AccountInfo(account_id=i, label=f"a{i}", streamable=True) for i in range(1, n_accounts + 1)]
    alloc = allocate(subscriptions=wishes(range(1, 100_001)), accounts=accounts)
    assert alloc.assigned_count == min(100_000, n_accounts * MAX_INSTRUMENTS_PER_API_KEY)
    assert alloc.assigned_count + len(alloc.unassigned) == 100_000
    check_limits(alloc)
