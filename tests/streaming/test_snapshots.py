"""Reading the engines' latest snapshots from outside the engine: a real engine streaming the
simulator over channels-redis answers a SnapshotReader; unknown tokens are absent after the
deadline, never invented."""

import pytest

from streaming.market import SyntheticMarket
from streaming.snapshots import SnapshotParseError, SnapshotReader, snapshot_parse
from tests.helpers import async_wait_until
from tests.streaming.engine.runtime_helpers import (
    InProcessEngine,
    instruments_from_market,
    make_account,
    subscribe,
)

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def chain(transactional_db):
    market = SyntheticMarket(seed=0)
    instruments_from_market(market)
    expiry = min(r["expiry"] for r in market.instruments
                 if r["name"] == "NIFTY" and r["instrument_type"] == "CE")
    tokens = sorted(r["instrument_token"] for r in market.instruments
                    if r["name"] == "NIFTY" and (r["expiry"] == expiry or r["instrument_type"] == "FUT"))
    subscribe([market.index_token("NIFTY"), *tokens])
    make_account("acc1", api_key="k1", access_token="tok-acc1")
    return [t for t in tokens if t != market.index_token("NIFTY")]


async def test_the_reader_gets_live_books_and_greeks_from_the_running_engine(chain):
    async with InProcessEngine(accounts={"acc1": "k1"}) as h:
        reader = SnapshotReader(h.layer, timeout_s=5.0)
        wanted = chain[:6]

        async def all_with_greeks():
            got = await reader.latest(wanted)
            options = [s for s in got.values() if s.is_option]
            return got if len(got) == len(wanted) and options and all(
                s.delta is not None for s in options) else None

        got = await async_wait_until(all_with_greeks, timeout_s=90, what="live snapshots")
        for token, snapshot in got.items():
            assert snapshot.token == token and snapshot.is_mock is False
            assert snapshot.bid is not None and snapshot.ask is not None and snapshot.ask_qty > 0

        short = SnapshotReader(h.layer, timeout_s=0.5)
        partial = await short.latest([wanted[0], 999_999_999])
        assert set(partial) == {wanted[0]}


def test_an_item_of_another_version_is_refused_with_its_token():
    with pytest.raises(SnapshotParseError, match="token 7 has schema v2"):
        snapshot_parse(b'{"v":2,"token":7,"symbol":"X","exchange":"NSE","name":"X","kind":"EQ",'
                       b'"ltp":1.0,"is_mock":false}')
