"""MARKET_HOURS_ALWAYS_OPEN: every moment is in session, so the engine streams live (and
reports the market open) on any date: what running against the simulator needs."""

import datetime as dt

from django.test import override_settings

from streaming.engine.config import EngineConfig
from streaming.engine.market_hours import MarketHours, ModePolicy
from streaming.market import IST

SUNDAY_NIGHT = dt.datetime(2030, 1, 6, 23, 0, tzinfo=IST).timestamp()
WEDNESDAY_NOON = dt.datetime(2030, 1, 9, 12, 0, tzinfo=IST).timestamp()


def test_the_calendar_is_closed_on_a_sunday_night_and_open_on_a_wednesday_noon():
    assert dt.datetime.fromtimestamp(SUNDAY_NIGHT, IST).weekday() == 6
    hours = MarketHours()
    assert not hours.is_open(SUNDAY_NIGHT)
    assert hours.is_open(WEDNESDAY_NOON)


def test_always_open_is_open_at_any_hour_and_never_changes_within_a_day():
    hours = MarketHours(always_open=True)
    assert hours.is_open(SUNDAY_NIGHT) and hours.is_open(WEDNESDAY_NOON)
    assert hours.next_change_epoch_s(SUNDAY_NIGHT) == SUNDAY_NIGHT + 86400.0


def test_with_always_open_the_engine_streams_live_without_being_forced():
    closed = ModePolicy(hours=MarketHours(), mock_enabled=True)
    always = ModePolicy(hours=MarketHours(always_open=True), mock_enabled=True)
    assert closed.mode_at(SUNDAY_NIGHT) == "mock"
    assert always.mode_at(SUNDAY_NIGHT) == "live"


def test_the_setting_is_read_once_into_the_engine_config():
    from django.conf import settings

    with override_settings(MARKET_HOURS_ALWAYS_OPEN=True):
        assert EngineConfig.from_settings(settings, engine_id="e").market_always_open is True
    with override_settings(MARKET_HOURS_ALWAYS_OPEN=False):
        assert EngineConfig.from_settings(settings, engine_id="e").market_always_open is False
