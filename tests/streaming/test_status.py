"""The engine status document: one writer, one parser, and every reader fails loudly on a
renamed field (/health, the chain page's reference price, the drift report, the rebalancer)."""

import datetime as dt
import logging

import pytest
from django.utils import timezone

from streaming import status
from streaming.consumers import reference_price
from streaming.health import HealthContext, health_report
from streaming.models import EngineHeartbeat
from subscriptions.jobs import subscriptions_reconcile
from subscriptions.rebalancer import heartbeat_prices
from tests.helpers import engine_status

EXPIRY = dt.date(2026, 12, 29)


def document() -> dict:
    now_s = timezone.now().timestamp()
    return engine_status(
        engine_id="e1",
        accounts={"acc1": {"instruments": 10, "last_tick_age_s": 0.2}},
        underlyings={"NIFTY": {"price": 26_000.0, "ts": now_s,
                               "forwards": {EXPIRY.isoformat(): 26_100.0}}},
        streamed_count=10,
    )


def store(state: dict) -> EngineHeartbeat:
    now = timezone.now()
    return EngineHeartbeat.objects.create(engine_id="e1", hostname="h", pid=1, started_at=now,
                                          updated_at=now, state=state)


def events(caplog, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if isinstance(r.msg, dict) and r.msg.get("event") == event]


def read_all(hb: EngineHeartbeat) -> dict:
    """What each of the four readers makes of the stored document."""
    now = timezone.now()
    health = health_report(HealthContext(redis_url="", heartbeat_max_age_s=15, stream_stall_s=30))
    return {
        "health": health,
        "chain": reference_price(underlying="NIFTY", expiry=EXPIRY, heartbeat_max_age_s=15, now=now),
        "drift": subscriptions_reconcile(now=now, heartbeat_max_age_s=15, grace_s=0).report,
        "rebalancer": heartbeat_prices([hb], now=now, max_age_s=30),
    }


def test_the_writers_document_round_trips_through_the_parser():
    doc = document()
    parsed = status.parse(doc, engine_id="e1")
    assert parsed.to_json() == doc
    assert parsed.underlyings["NIFTY"].forwards == {EXPIRY: 26_100.0}


@pytest.mark.django_db
def test_every_reader_reads_a_valid_document():
    seen = read_all(store(document()))
    assert "engine_status_invalid" not in [r["code"] for r in seen["health"]["reasons"]]
    assert seen["health"]["engines"][0]["streamed_count"] == 10
    assert seen["chain"] == (26_100.0, "forward")
    assert seen["drift"].heartbeat_streamed == 10
    assert seen["rebalancer"]["NIFTY"].forwards == {EXPIRY: 26_100.0}


@pytest.mark.django_db
@pytest.mark.parametrize("field", ["mode", "accounts", "underlyings", "streamed_count"])
def test_a_renamed_field_makes_every_reader_fail_loudly(field, caplog):
    caplog.set_level(logging.INFO)
    doc = document()
    doc[f"{field}_v2"] = doc.pop(field)
    with pytest.raises(status.StatusError, match="e1"):
        status.parse(doc, engine_id="e1")

    seen = read_all(store(doc))

    reasons = {r["code"]: r for r in seen["health"]["reasons"]}
    assert reasons["engine_status_invalid"]["engine"] == "e1"
    assert seen["health"]["engines"] == []
    assert seen["chain"] == (None, None)
    assert events(caplog, "ws.engine_status_invalid")
    assert not seen["drift"].ok and "unreadable engine status from e1" in seen["drift"].summary
    assert events(caplog, "subscriptions.engine_status_invalid")
    assert seen["rebalancer"] == {}
    assert events(caplog, "rebalancer.engine_status_invalid")
