"""JobLock: one owner at a time, renewable by its owner, taken over after expiry."""

import datetime as dt
import uuid

import pytest
from django.db import transaction
from django.utils import timezone

from streaming.locks import job_lock, joblock_acquire, joblock_owner_id, joblock_release, run_locked
from streaming.models import JobLock
from tests.subscriptions.conftest import run_in_threads

pytestmark = pytest.mark.django_db


def test_a_free_lock_is_taken_and_a_held_one_is_refused():
    assert joblock_acquire(name="job", owner="a", ttl_s=60)
    assert not joblock_acquire(name="job", owner="b", ttl_s=60)
    assert JobLock.objects.get(name="job").owner == "a"


def test_the_owner_renews_its_lock():
    now = timezone.now()
    assert joblock_acquire(name="job", owner="a", ttl_s=10, now=now)
    assert joblock_acquire(name="job", owner="a", ttl_s=100, now=now)
    assert JobLock.objects.get(name="job").expires_at == now + dt.timedelta(seconds=100)


def test_an_expired_lock_is_taken_over():
    past = timezone.now() - dt.timedelta(minutes=5)
    assert joblock_acquire(name="job", owner="dead-worker", ttl_s=60, now=past)
    assert joblock_acquire(name="job", owner="b", ttl_s=60)
    assert JobLock.objects.get(name="job").owner == "b"


def test_only_the_owner_releases():
    joblock_acquire(name="job", owner="a", ttl_s=60)
    assert not joblock_release(name="job", owner="b")
    assert JobLock.objects.filter(name="job").exists()
    assert joblock_release(name="job", owner="a")
    assert not JobLock.objects.filter(name="job").exists()


def test_job_lock_skips_when_held_and_leaves_the_holder_alone():
    joblock_acquire(name="job", owner="other", ttl_s=60)
    with job_lock(name="job", ttl_s=60, owner="me") as acquired:
        assert acquired is False
    assert JobLock.objects.get(name="job").owner == "other"


def test_job_lock_releases_after_the_block_even_on_error():
    with pytest.raises(RuntimeError), job_lock(name="job", ttl_s=60, owner="me") as acquired:
        assert acquired is True
        assert JobLock.objects.get(name="job").owner == "me"
        raise RuntimeError("job failed")
    assert not JobLock.objects.filter(name="job").exists()


def test_acquire_inside_a_transaction_that_loses_does_not_break_it():
    joblock_acquire(name="job", owner="a", ttl_s=60)
    with transaction.atomic():
        assert not joblock_acquire(name="job", owner="b", ttl_s=60)
        # The transaction is still usable after the lost INSERT race.
        assert JobLock.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_concurrent_acquires_have_exactly_one_winner():
    results = run_in_threads(
        lambda: joblock_acquire(name="race", owner=uuid.uuid4().hex, ttl_s=60), count=8
    )
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert results.count(True) == 1
    assert JobLock.objects.filter(name="race").count() == 1


def test_the_same_task_takes_over_the_lock_its_earlier_try_left():
    """A try killed mid-job (or whose release met a database blip) leaves its row; the
    redelivery or retry of that task, in another worker process, takes it over at once."""
    left = "host:1111:task-1"
    assert joblock_acquire(name="job", owner=left, ttl_s=600)
    assert not joblock_acquire(name="job", owner="host:2222:task-2", ttl_s=60, task_id="task-2")
    assert joblock_acquire(name="job", owner="host:2222:task-1", ttl_s=60, task_id="task-1")
    assert JobLock.objects.get(name="job").owner == "host:2222:task-1"


def test_run_locked_runs_a_redelivered_task_despite_the_row_its_dead_try_left():
    joblock_acquire(name="job", owner="host:1111:task-1", ttl_s=600)
    assert run_locked(name="job", time_limit_s=60, task_id="task-1", fn=lambda: "ran") == "ran"
    assert run_locked(name="job", time_limit_s=60, task_id="task-2", fn=lambda: "ran") == "ran"
    joblock_acquire(name="job", owner=joblock_owner_id("task-3"), ttl_s=600)
    assert run_locked(name="job", time_limit_s=60, task_id="task-4", fn=lambda: "ran") == {
        "skipped": "lock job held by another run"
    }
    assert not JobLock.objects.filter(name="job", owner__endswith=":task-4").exists()
