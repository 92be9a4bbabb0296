"""The heartbeat writer: its row every interval, and the rows of long-dead engines pruned."""

import asyncio
import datetime as dt

import pytest
from django.utils import timezone

from streaming.engine.heartbeat import PRUNE_AFTER_S, HeartbeatWriter
from streaming.engine.store import run_db
from streaming.models import EngineHeartbeat
from streaming.status import EngineStatus
from tests.helpers import async_wait_until, engine_status

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def dead_engines(transactional_db):
    long_ago = timezone.now() - dt.timedelta(seconds=PRUNE_AFTER_S + 60)
    recent = timezone.now() - dt.timedelta(hours=1)
    for engine_id, when in (("dead:1:a", long_ago), ("resting:2:b", recent)):
        EngineHeartbeat.objects.create(
            engine_id=engine_id, hostname="h", pid=1, started_at=when, updated_at=when, state={}
        )


async def test_writes_its_state_every_interval_and_prunes_long_dead_rows(dead_engines):
    beats = []

    def status():
        beats.append(1)
        return EngineStatus.model_validate(engine_status(mode="mock", reloads=len(beats)))

    writer = HeartbeatWriter(engine_id="me:3:c", interval_s=0.1, started_at=timezone.now())
    task = asyncio.create_task(writer.run(status))
    try:
        await async_wait_until(lambda: writer.writes >= 3, timeout_s=10, what="three beats")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    rows = await run_db(lambda: dict(EngineHeartbeat.objects.values_list("engine_id", "state")))
    assert set(rows) == {"resting:2:b", "me:3:c"}
    assert rows["me:3:c"]["reloads"] >= 3
