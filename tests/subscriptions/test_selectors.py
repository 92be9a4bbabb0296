"""Subscription selectors filter in SQL (defect 8): each filter appears in the query."""

import datetime as dt

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from accounts.models import KiteAccount
from subscriptions import selectors
from subscriptions.models import Subscription
from tests.conftest import make_option

pytestmark = pytest.mark.django_db

EXPIRY = dt.date(2026, 11, 24)


@pytest.fixture
def rows():
    account = KiteAccount.objects.create(label="a1", api_key="k1")
    other = KiteAccount.objects.create(label="a2", api_key="k2")
    subs = []
    for i, (strike, status, mode, source) in enumerate(
        [
            (24000, "active", "full", "manual"),
            (24050, "inactive", "full", "manual"),
            (24100, "active", "quote", "rebalancer"),
            (24150, "active", "ltp", "api"),
        ]
    ):
        instrument = make_option(token=1000 + i, name="NIFTY", expiry=EXPIRY, strike=strike, kind="CE")
        instrument.save()
        subs.append(
            Subscription.objects.create(instrument=instrument, status=status, mode=mode, source=source)
        )
    subs[0].pinned_account = account
    subs[0].save()
    subs[2].assigned_account = account
    subs[2].save()
    subs[3].assigned_account = other
    subs[3].save()
    return account, subs


def _sql_of(**filters) -> tuple[str, list[int]]:
    with CaptureQueriesContext(connection) as ctx:
        tokens = [s.instrument_id for s in selectors.subscription_list(**filters)]
    assert len(ctx.captured_queries) == 1, "one query, instruments joined"
    return ctx.captured_queries[0]["sql"], tokens


@pytest.mark.parametrize(
    ("filters", "sql_fragment", "expected_tokens"),
    [
        ({"status": "active"}, '"subscriptions_subscription"."status" = \'active\'', [1000, 1002, 1003]),
        ({"mode": "quote"}, '"subscriptions_subscription"."mode" = \'quote\'', [1002]),
        ({"source": "api"}, '"subscriptions_subscription"."source" = \'api\'', [1003]),
        ({"segment": "NFO-OPT"}, '"subscriptions_instrument"."segment" = \'NFO-OPT\'', [1000, 1001, 1002, 1003]),
        ({"underlying": "NIFTY"}, '"subscriptions_instrument"."name" = \'NIFTY\'', [1000, 1001, 1002, 1003]),
    ],
)
def test_each_filter_runs_in_sql(rows, filters, sql_fragment, expected_tokens):
    sql, tokens = _sql_of(**filters)
    assert sql_fragment in sql
    assert tokens == expected_tokens


def test_account_filter_matches_pinned_or_assigned_in_sql(rows):
    account, _ = rows
    sql, tokens = _sql_of(account_id=account.pk)
    assert f'"subscriptions_subscription"."pinned_account_id" = {account.pk}' in sql
    assert f'"subscriptions_subscription"."assigned_account_id" = {account.pk}' in sql
    assert tokens == [1000, 1002]


def test_combined_filters_all_in_one_where(rows):
    sql, tokens = _sql_of(status="active", mode="full", source="manual")
    for fragment in ("\"status\" = 'active'", "\"mode\" = 'full'", "\"source\" = 'manual'"):
        assert fragment in sql
    assert tokens == [1000]


def test_chain_selector_filters_in_sql(rows):
    with CaptureQueriesContext(connection) as ctx:
        strikes = [i.strike for i in selectors.instrument_list_chain(
            underlying="NIFTY", expiry=EXPIRY, strike_min=24050, strike_max=24100
        )]
    sql = ctx.captured_queries[0]["sql"]
    assert '"expiry" = \'2026-11-24\'' in sql and '"strike" >= 24050' in sql and '"strike" <= 24100' in sql
    assert strikes == [24050, 24100]
