"""Portfolio Greeks in rupees from net positions and snapshots (pure: no database, no engine)."""

import pytest

from accounts.portfolio_greeks import NetPosition, PortfolioGreeks
from streaming.snapshots import LiveSnapshot


def snap(token: int, **fields) -> LiveSnapshot:
    base = {"v": 1, "token": token, "symbol": f"S{token}", "exchange": "NFO", "name": "NIFTY",
            "kind": "CE", "ltp": 100.0, "delta": 0.5, "gamma": 0.001, "theta": -10.0,
            "vega": 12.0, "is_mock": False}
    return LiveSnapshot(**{**base, **fields})


def pos(token: int, quantity: int, **fields) -> NetPosition:
    base = {"account_id": 1, "token": token, "exchange": "NFO", "tradingsymbol": f"S{token}",
            "product": "NRML", "quantity": quantity, "lot_size": 75, "underlying": "NIFTY"}
    return NetPosition(**{**base, **fields})


def test_rupee_greeks_are_lots_times_lot_size_times_the_snapshot_greek_summed_per_underlying():
    snaps = {1: snap(1), 2: snap(2, kind="PE", delta=-0.3, gamma=0.002, theta=-8.0, vega=10.0),
             3: snap(3, name="BANKNIFTY", delta=0.25, gamma=0.0005, theta=-20.0, vega=30.0),
             4: snap(4, kind="FUT", delta=None, gamma=None, theta=None, vega=None)}
    positions = [pos(1, 150), pos(2, -75), pos(3, 30, lot_size=30, underlying="BANKNIFTY"),
                 pos(4, 75, kind="FUT")]
    portfolio = PortfolioGreeks().build(positions, snaps)

    nifty = portfolio.by_underlying["NIFTY"]
    assert nifty.delta_rs == pytest.approx(2 * 75 * 0.5 + -1 * 75 * -0.3 + 75 * 1.0)
    assert nifty.gamma_rs == pytest.approx(2 * 75 * 0.001 + -1 * 75 * 0.002)
    assert nifty.theta_rs == pytest.approx(2 * 75 * -10.0 + -1 * 75 * -8.0)
    assert nifty.vega_rs == pytest.approx(2 * 75 * 12.0 + -1 * 75 * 10.0)
    bank = portfolio.by_underlying["BANKNIFTY"]
    assert bank.delta_rs == pytest.approx(1 * 30 * 0.25) and bank.vega_rs == pytest.approx(900.0)
    assert portfolio.total.delta_rs == pytest.approx(nifty.delta_rs + bank.delta_rs)
    assert portfolio.total.complete and portfolio.missing == []
    assert [r.lots for r in portfolio.rows] == [2.0, -1.0, 1.0, 1.0]


def test_an_option_without_greeks_is_flagged_and_left_out_of_the_sums():
    snaps = {1: snap(1), 2: snap(2, delta=None, gamma=None, theta=None, vega=None, iv=None,
                                 flags=["stale_underlying"])}
    portfolio = PortfolioGreeks().build([pos(1, 75), pos(2, 75), pos(9, -75, kind="CE")], snaps)
    assert portfolio.total.delta_rs == pytest.approx(75 * 0.5)
    assert portfolio.total.positions == 3 and not portfolio.total.complete
    assert not portfolio.by_underlying["NIFTY"].complete
    assert [(m["token"], m["reason"]) for m in portfolio.missing] == [
        (2, "stale_underlying"), (9, "no_snapshot")]


def test_pnl_is_sold_less_bought_plus_held_at_the_live_price():
    position = pos(1, 75, buy_quantity=150, sell_quantity=75, buy_value=150 * 90.0,
                   sell_value=75 * 95.0)
    row = PortfolioGreeks().build([position], {1: snap(1, ltp=100.0)}).rows[0]
    assert row.pnl == pytest.approx(75 * 95.0 - 150 * 90.0 + 75 * 100.0)


def test_a_closed_position_keeps_its_realised_pnl_and_no_greeks():
    position = pos(1, 0, buy_quantity=75, sell_quantity=75, buy_value=7500.0, sell_value=7800.0)
    portfolio = PortfolioGreeks().build([position], {1: snap(1)})
    assert portfolio.total.pnl == pytest.approx(300.0) and portfolio.total.delta_rs == 0.0
    assert portfolio.total.complete
