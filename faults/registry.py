"""Scenarios, their outcomes and promises, the runner that runs them, and the table writer.

A scenario is a function of the deployment returning an :class:`Outcome`: figures (printed
on one line) and promises (thresholds the issue or the docs state). A broken promise, or a
scenario that raised, makes the run exit 1.
"""

from __future__ import annotations

import datetime as dt
import importlib
import pkgutil
import platform
import subprocess
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GROUPS = ("smoke", "redis", "postgres", "kite", "engines", "clients", "celery", "orders", "security")


@dataclass(frozen=True)
class Promise:
    text: str
    held: bool
    detail: str = ""


@dataclass
class Outcome:
    figures: dict[str, Any] = field(default_factory=dict)
    promises: list[Promise] = field(default_factory=list)
    notes: str = ""

    @property
    def held(self) -> bool:
        return all(p.held for p in self.promises)


@dataclass(frozen=True)
class Scenario:
    name: str
    group: str
    quick: bool
    fn: Callable[[Any], Outcome]
    doc: str


_REGISTRY: dict[str, Scenario] = {}


def scenario(name: str, *, group: str, quick: bool = False):
    """Register ``fn`` as the scenario ``name`` (``<group>.<what>``)."""
    if group not in GROUPS:
        raise ValueError(f"unknown group {group!r}; expected one of {GROUPS}")
    if not name.startswith(f"{group}."):
        raise ValueError(f"scenario {name!r} must be named {group}.<what>")

    def register(fn: Callable[[Any], Outcome]) -> Callable[[Any], Outcome]:
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise ValueError(f"scenario {name!r} registered twice")
        doc = " ".join((fn.__doc__ or "").strip().split("\n\n")[0].split())
        _REGISTRY[name] = Scenario(name=name, group=group, quick=quick, fn=fn, doc=doc)
        return fn

    return register


def load_scenarios() -> dict[str, Scenario]:
    """Import every module of faults.scenarios (each registers its own) and return them all,
    in group order then module order."""
    import faults.scenarios as package

    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"faults.scenarios.{module.name}")
    order = {g: i for i, g in enumerate(GROUPS)}
    return dict(sorted(_REGISTRY.items(), key=lambda kv: order[kv[1].group]))


def select(scenarios: dict[str, Scenario], *, quick: bool, only: list[str] | None,
           group: str | None) -> list[Scenario]:
    chosen = list(scenarios.values())
    if quick:
        chosen = [s for s in chosen if s.quick]
    if group:
        chosen = [s for s in chosen if s.group == group]
    if only:
        unknown = [n for n in only if n not in scenarios]
        if unknown:
            raise SystemExit(f"unknown scenario(s) {unknown}; known: {sorted(scenarios)}")
        kept = {s.name for s in chosen}
        chosen = [scenarios[n] for n in dict.fromkeys(only) if n in kept]  # in the order given
    return chosen


@dataclass
class Result:
    scenario: Scenario
    outcome: Outcome | None
    seconds: float
    error: str = ""
    #: What the reset after the scenario had to do beyond waiting (printed, not a failure).
    reset_notes: list[str] = field(default_factory=list)

    @property
    def held(self) -> bool:
        return self.outcome is not None and not self.error and self.outcome.held

    def line(self) -> str:
        mark = "ok  " if self.held else "FAIL"
        if self.outcome is None:
            return f"{mark} {self.scenario.name} ({self.seconds:.0f} s): raised {self.error}"
        figures = " ".join(f"{k}={_fmt(v)}" for k, v in self.outcome.figures.items())
        broken = [p for p in self.outcome.promises if not p.held]
        tail = "" if not broken else " | BROKEN: " + "; ".join(
            f"{p.text} ({p.detail})" if p.detail else p.text for p in broken)
        error = f" | reset failed: {self.error}" if self.error else ""
        notes = f" | reset: {'; '.join(self.reset_notes)}" if self.reset_notes else ""
        return f"{mark} {self.scenario.name} ({self.seconds:.0f} s): {figures}{tail}{error}{notes}"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    if value is None:
        return "n/a"
    return str(value)


def run(dep, scenarios: list[Scenario], *, print_fn=print, results: list[Result] | None = None,
        after_each: Callable[[list[Result]], None] | None = None) -> list[Result]:
    """Run each scenario; a raise is a broken scenario; reset the deployment after each.

    ``results`` is filled as scenarios end (the caller keeps what ran if interrupted);
    ``after_each`` is called with them after each one (e.g. to rewrite the table).
    """
    results = [] if results is None else results
    for sc in scenarios:
        began = time.monotonic()
        dep.probe.mark(f"start {sc.name}")
        outcome, error = None, ""
        try:
            outcome = sc.fn(dep)
            if not isinstance(outcome, Outcome):
                raise TypeError(f"scenario returned {type(outcome).__name__}, not Outcome")
        except Exception as exc:  # noqa: BLE001 - one scenario's failure is its own line
            outcome = None
            error = f"{type(exc).__name__}: {exc}"
            tb_path = dep.logs_dir / f"scenario-{sc.name}.traceback.txt"
            tb_path.write_text(traceback.format_exc())
            error += f" (traceback: {tb_path})"
        dep.probe.mark(f"end {sc.name}")
        result = Result(scenario=sc, outcome=outcome, seconds=time.monotonic() - began, error=error)
        notes_before = len(dep.reset_notes)
        try:  # also after the last one: a deployment that does not recover is a finding
            dep.reset_between_scenarios()
        except Exception as exc:  # noqa: BLE001
            result.error = (result.error + "; " if result.error else "") + \
                f"reset_between_scenarios: {type(exc).__name__}: {exc}"
        result.reset_notes = dep.reset_notes[notes_before:]
        results.append(result)
        print_fn(result.line(), flush=True)
        if after_each is not None:
            after_each(results)
    return results


def machine_facts() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    # In UTC: the runner's Django has set TZ to TIME_ZONE (IST) by then.
    uptime = subprocess.run(["uptime"], capture_output=True, text=True,
                            env={**os.environ, "TZ": "UTC"}).stdout.strip()

    return {"cpu": f"{cpu} x {os.cpu_count()}", "uptime": uptime, "python": platform.python_version()}


def write_doc(path: Path, results: list[Result], *, command: str, started: dt.datetime,
              load_before: str, load_after: str, cpu: str, total_s: float,
              planned: list[Scenario], revision: str, state: str) -> None:
    """docs/reliability.md: the table of this run, with the command, date, load and CPU.

    ``state``: "complete", "running" (rewritten after each scenario) or "interrupted"; the
    scenarios planned but not run are listed as such.
    """
    broken = [r for r in results if not r.held]
    ran = {r.scenario.name for r in results}
    not_run = [s for s in planned if s.name not in ran]
    lines = [
        "# Reliability: the fault-injection and security suite",
        "",
        "Generated by `python -m faults --write-doc` (`make faults`); do not edit by hand. Each",
        "row is one scenario run against the whole deployment (private PostgreSQL and Redis,",
        "daphne, two runtickers, Celery worker and beat, the Kite simulator, 50 acknowledging",
        "WebSocket clients, a 5 ms probe); how it is built: `faults/` and the section at the end.",
        "",
        f"- Command: `{command}` (source {revision})",
        f"- Date: {started:%Y-%m-%d %H:%M} UTC; duration {total_s / 60:.1f} min; run {state}",
        f"- Machine: {cpu}",
        f"- Load before: `{load_before}`",
        f"- Load after: `{load_after}`",
        f"- Result: {len(results) - len(broken)} of {len(results)} scenarios held every promise"
        + ("." if not broken else f"; NOT held: {', '.join(r.scenario.name for r in broken)}."),
        *([f"- Not run ({state}): {', '.join(f'`{s.name}`' for s in not_run)}."] if not_run else []),
        "",
        "| Scenario | What | Figures | Promises | Held |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        if r.outcome is None:
            figures, promises = "", f"raised: {_cell(r.error)}"
        else:
            figures = ", ".join(f"{k}={_fmt(v)}" for k, v in r.outcome.figures.items())
            promises = "<br>".join(
                f"{'✔' if p.held else '✘'} {_cell(p.text)}" + (f" ({_cell(p.detail)})" if p.detail else "")
                for p in r.outcome.promises
            )
            if r.error:
                promises += f"<br>✘ {_cell(r.error)}"
        lines.append(f"| `{r.scenario.name}` | {_cell(r.scenario.doc)} | {_cell(figures)} | "
                     f"{promises} | {'yes' if r.held else '**no**'} |")
    lines += ["", *_HOW_IT_WORKS]
    path.write_text("\n".join(lines) + "\n")


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


_HOW_IT_WORKS = [
    "## How the suite runs",
    "",
    "- `make faults` runs every scenario and rewrites this file; `make faults-quick` runs the",
    "  CI subset (`tests/test_faults_quick.py` runs it under `make test`). `python -m faults",
    "  --only NAME[,NAME] | --group G` runs a selection. Exit status 1 if any promise broke.",
    "- Private instances: `initdb` of PostgreSQL 15 in a temp dir (as the `postgres` user) and",
    "  `redis-server` without persistence, on free ports; nothing else on the machine is touched.",
    "- Product processes reach PostgreSQL, Redis and the simulator (REST and WebSocket)",
    "  through the suite's own TCP proxy (pass / delay / reset / black-hole); the runner goes",
    "  direct. The runtickers run `--no-mock` with `MARKET_HOURS_ALWAYS_OPEN=true`, so they",
    "  stream live from the simulator on any date.",
    "- The probe samples every 5 ms: `/health` status and latency, RSS and CPU of every",
    "  process, Redis used memory, Kite connections per api_key; metrics every 500 ms.",
    "- After each scenario every proxy is set back to pass, every process is up, the",
    "  simulator's faults are cleared, and the runner waits until `/health` is 200 and every",
    "  client is fresh again.",
    "- Logs of every process are kept in the run's temp dir (its path is printed first).",
]
