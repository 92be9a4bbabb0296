"""The fault suite's registry and table (faults/registry.py), without a deployment: names
and groups are checked, a selection keeps the order asked, a scenario's line shows its
figures and broken promises, and docs/reliability.md's table says what ran and what did not."""

import datetime as dt

import pytest

from faults.registry import Outcome, Promise, Result, Scenario, scenario, select, write_doc


def _scenario(name: str, *, quick: bool = False, doc: str = "does a thing") -> Scenario:
    return Scenario(name=name, group=name.split(".")[0], quick=quick, fn=lambda dep: Outcome(),
                    doc=doc)


def test_a_scenario_is_named_after_its_group():
    with pytest.raises(ValueError, match=r"must be named redis\.<what>"):
        scenario("postgres.restart", group="redis")
    with pytest.raises(ValueError, match="unknown group 'disk'"):
        scenario("disk.full", group="disk")


def test_select_keeps_the_order_asked_and_the_quick_subset():
    known = {s.name: s for s in (_scenario("redis.a", quick=True), _scenario("kite.b"),
                                 _scenario("kite.c", quick=True))}
    assert [s.name for s in select(known, quick=False, only=["kite.c", "redis.a"], group=None)] \
        == ["kite.c", "redis.a"]
    assert [s.name for s in select(known, quick=True, only=None, group=None)] == ["redis.a", "kite.c"]
    assert [s.name for s in select(known, quick=False, only=None, group="kite")] == ["kite.b", "kite.c"]
    with pytest.raises(SystemExit, match="unknown scenario"):
        select(known, quick=False, only=["kite.nope"], group=None)


def test_a_line_shows_figures_and_what_broke():
    held = Result(_scenario("redis.a"), Outcome({"resume_s": 2.125, "lost": 0},
                                                [Promise("lost = 0", True)]), seconds=12.0)
    broken = Result(_scenario("kite.b"), Outcome({"n": 3}, [Promise("n <= 2", False, "3")]),
                    seconds=5.0)
    raised = Result(_scenario("kite.c"), None, seconds=1.0, error="TimeoutError: late")
    assert held.held and held.line() == "ok   redis.a (12 s): resume_s=2.12 lost=0"
    assert not broken.held and broken.line() == "FAIL kite.b (5 s): n=3 | BROKEN: n <= 2 (3)"
    assert not raised.held and "raised TimeoutError: late" in raised.line()


def test_the_table_lists_every_result_and_what_did_not_run(tmp_path):
    planned = [_scenario("redis.a", doc="Redis restarted"), _scenario("kite.b"),
               _scenario("kite.c")]
    results = [
        Result(planned[0], Outcome({"resume_s": 2.5}, [Promise("resumes within 5 s", True)]), 9.0),
        Result(planned[1], Outcome({"n": 3}, [Promise("n <= 2 | at most", False, "3")]), 4.0),
    ]
    doc = tmp_path / "reliability.md"
    write_doc(doc, results, command="python -m faults --write-doc",
              started=dt.datetime(2030, 1, 9, 10, 0, tzinfo=dt.UTC), load_before="load 1.0",
              load_after="load 2.0", cpu="Some CPU x 2", total_s=600.0, planned=planned,
              revision="abc1234", state="interrupted")
    text = doc.read_text()
    assert "`python -m faults --write-doc` (source abc1234)" in text
    assert "2030-01-09 10:00 UTC; duration 10.0 min; run interrupted" in text
    assert "Some CPU x 2" in text and "`load 1.0`" in text and "`load 2.0`" in text
    assert "1 of 2 scenarios held every promise; NOT held: kite.b." in text
    assert "Not run (interrupted): `kite.c`." in text
    assert "| `redis.a` | Redis restarted | resume_s=2.5 | ✔ resumes within 5 s | yes |" in text
    assert "✘ n <= 2 \\| at most (3) | **no** |" in text  # a pipe in a cell is escaped
