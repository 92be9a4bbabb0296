"""Account leases: one owner at a time, renewed, taken over after expiry, released at once,
and given up locally before they can expire under a process that cannot renew."""

import asyncio
import socket
from functools import partial

import pytest

from accounts.models import KiteAccount
from accounts.services import account_set_session
from streaming.engine.leases import (
    LeaseManager,
    lease_owners,
    lease_release,
    lease_renew,
    lease_try_acquire,
    make_engine_id,
)
from streaming.engine.store import account_expire_session, run_db
from streaming.models import AccountLease
from tests.helpers import async_wait_until

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def accounts():
    return [
        KiteAccount.objects.create(label=f"acc{i}", api_key=f"key{i}", access_token="t")
        for i in range(1, 4)
    ]


wait_for = partial(async_wait_until, timeout_s=30.0)


class Recorder:
    def __init__(self):
        self.acquired = []
        self.lost = []

    async def on_acquired(self, aid):
        self.acquired.append(aid)

    async def on_lost(self, aid):
        self.lost.append(aid)


def test_engine_ids_are_unique_per_start():
    a, b = make_engine_id(), make_engine_id()
    assert a != b
    host, pid, _ = a.split(":")
    assert host == socket.gethostname()
    assert pid.isdigit()


def test_a_given_engine_id_prefix_still_gets_a_random_suffix():
    a, b = make_engine_id(prefix="engine-A"), make_engine_id(prefix="engine-A")
    assert a != b
    assert a.startswith("engine-A:") and b.startswith("engine-A:")
    assert len(make_engine_id(prefix="x" * 300)) == 200
    assert make_engine_id(prefix="x" * 300) != make_engine_id(prefix="x" * 300)


def test_conditional_acquire_renew_release(accounts):
    acc = accounts[0]
    assert lease_try_acquire(account_id=acc.pk, owner="A", ttl_s=30)
    assert not lease_try_acquire(account_id=acc.pk, owner="B", ttl_s=30)
    # Re-acquiring our own lease renews it and keeps acquired_at.
    first = AccountLease.objects.get(pk=acc.pk)
    assert lease_try_acquire(account_id=acc.pk, owner="A", ttl_s=30)
    again = AccountLease.objects.get(pk=acc.pk)
    assert again.acquired_at == first.acquired_at
    assert again.expires_at >= first.expires_at
    assert lease_renew(account_ids=[acc.pk, accounts[1].pk], owner="A", ttl_s=30) == {acc.pk}
    assert lease_renew(account_ids=[acc.pk], owner="B", ttl_s=30) == set()
    assert lease_release(account_ids=[acc.pk], owner="B") == 0
    assert lease_release(account_ids=[acc.pk], owner="A") == 1
    assert lease_try_acquire(account_id=acc.pk, owner="B", ttl_s=30)
    assert lease_owners()[acc.pk][0] == "B"


def test_an_expired_lease_is_taken_over_and_its_acquired_at_resets(accounts):
    acc = accounts[0]
    assert lease_try_acquire(account_id=acc.pk, owner="A", ttl_s=30)
    AccountLease.objects.filter(pk=acc.pk).update(
        expires_at=AccountLease.objects.get(pk=acc.pk).acquired_at.replace(year=2000)
    )
    assert lease_try_acquire(account_id=acc.pk, owner="B", ttl_s=30)
    lease = AccountLease.objects.get(pk=acc.pk)
    assert lease.owner == "B"
    assert lease.acquired_at.year > 2000
    # A's renewal now finds nothing of its own.
    assert lease_renew(account_ids=[acc.pk], owner="A", ttl_s=30) == set()


async def test_takeover_after_a_holder_dies_and_immediately_after_a_release(accounts):
    ids = [a.pk for a in accounts]
    rec_a, rec_b = Recorder(), Recorder()
    a = LeaseManager(owner="A", ttl_s=3.0, on_acquired=rec_a.on_acquired, on_lost=rec_a.on_lost,
                     check_interval_s=0.1)
    b = LeaseManager(owner="B", ttl_s=3.0, on_acquired=rec_b.on_acquired, on_lost=rec_b.on_lost,
                     check_interval_s=0.1)
    a.set_wanted(ids)
    task_a = asyncio.create_task(a.run())
    await wait_for(lambda: sorted(rec_a.acquired) == ids)
    b.set_wanted(ids)
    task_b = asyncio.create_task(b.run())
    try:
        # B keeps trying; A renews every second, so B gets nothing.
        await asyncio.sleep(2.5)
        assert rec_b.acquired == []
        # A dies without releasing: B takes over once the rows expire (ttl 3 s).
        task_a.cancel()
        await asyncio.gather(task_a, return_exceptions=True)
        # Each account exactly once, and only now: how fast is a benchmark's business.
        await wait_for(lambda: len(rec_b.acquired) >= len(ids), timeout_s=30)
        assert sorted(rec_b.acquired) == ids
        owners = await run_db(lease_owners)
        assert {owner for owner, _ in owners.values()} == {"B"}

        # B releases on shutdown; a fresh manager takes over at once, not after the ttl.
        await b.release_all()
        assert sorted(rec_b.lost) == ids
        rec_c = Recorder()
        c = LeaseManager(owner="C", ttl_s=30.0, on_acquired=rec_c.on_acquired,
                         on_lost=rec_c.on_lost, check_interval_s=0.1)
        c.set_wanted(ids)
        task_c = asyncio.create_task(c.run())
        # Well inside C's 30 s ttl: the released rows are free at once, not on expiry.
        await wait_for(lambda: sorted(rec_c.acquired) == ids, timeout_s=15)
        await c.release_all()
        task_c.cancel()
        await asyncio.gather(task_c, return_exceptions=True)
    finally:
        task_b.cancel()
        await asyncio.gather(task_b, return_exceptions=True)


async def test_a_stolen_lease_is_reported_lost(accounts):
    aid = accounts[0].pk
    rec = Recorder()
    m = LeaseManager(owner="A", ttl_s=3.0, on_acquired=rec.on_acquired, on_lost=rec.on_lost,
                     check_interval_s=0.05)
    m.set_wanted([aid])
    task = asyncio.create_task(m.run())
    try:
        await wait_for(lambda: rec.acquired == [aid])
        await run_db(lambda: AccountLease.objects.filter(pk=aid).update(owner="thief"))
        await wait_for(lambda: rec.lost == [aid], timeout_s=5)
        assert not m.holds(aid)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_unwanted_accounts_are_stopped_and_released(accounts):
    ids = [a.pk for a in accounts]
    rec = Recorder()
    m = LeaseManager(owner="A", ttl_s=30.0, on_acquired=rec.on_acquired, on_lost=rec.on_lost,
                     check_interval_s=0.05)
    m.set_wanted(ids)
    task = asyncio.create_task(m.run())
    try:
        await wait_for(lambda: sorted(rec.acquired) == ids)
        m.set_wanted(ids[1:])
        await wait_for(lambda: rec.lost == [ids[0]])
        # on_lost runs before the row is deleted: wait on the database, not on the callback.

        async def released_owners():
            owners = await run_db(lease_owners)
            return owners if ids[0] not in owners else None

        owners = await async_wait_until(
            released_owners, timeout_s=30.0, what=f"lease of account {ids[0]} released"
        )
        assert sorted(owners) == ids[1:]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_connections_stop_before_the_row_can_expire_when_renewals_fail(accounts):
    """The local guard: no successful renewal for ttl - margin means stop, by our own clock."""
    aid = accounts[0].pk
    rec = Recorder()
    fake_now = [1000.0]
    m = LeaseManager(owner="A", ttl_s=15.0, on_acquired=rec.on_acquired, on_lost=rec.on_lost,
                     check_interval_s=0.02, clock=lambda: fake_now[0])
    m.set_wanted([aid])
    task = asyncio.create_task(m.run())
    try:
        await wait_for(lambda: rec.acquired == [aid])
        # Freeze renewals by making every round see no time pass... then jump the clock past
        # the local deadline (acquired at 1000 + 15 - 5 = 1010) without any DB round running:
        # the guard fires before the loop gets to renew.
        m._last_round_monotonic = float("inf")  # no rounds: renewals "fail"
        fake_now[0] = 1009.9
        await asyncio.sleep(0.1)
        assert rec.lost == []
        fake_now[0] = 1010.0
        await wait_for(lambda: rec.lost == [aid], timeout_s=2)
        # The database row still has ~15 s to live: we stopped well before anyone could take it.
        owners = await run_db(lease_owners)
        assert owners[aid][0] == "A"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_an_account_whose_session_expired_is_not_taken_until_a_new_login(accounts):
    """The engine that saw Kite refuse the token releases the lease; another engine that has
    not reloaded yet must not take it (and try the refused token again)."""
    acc = accounts[0]
    assert lease_try_acquire(account_id=acc.pk, owner="A", ttl_s=30)
    account_expire_session(account_id=acc.pk, reason="Kite refused the token (403)",
                           token_issued_at=acc.token_issued_at)
    assert lease_release(account_ids=[acc.pk], owner="A") == 1
    assert not lease_try_acquire(account_id=acc.pk, owner="B", ttl_s=30)
    assert acc.pk not in lease_owners()
    account_set_session(account=KiteAccount.objects.get(pk=acc.pk), access_token="new-token")
    assert lease_try_acquire(account_id=acc.pk, owner="B", ttl_s=30)
