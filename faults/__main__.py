"""``python -m faults [--quick] [--only NAME[,NAME]] [--group G] [--write-doc] [--list]``."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

from faults.registry import GROUPS, load_scenarios, machine_facts, run, select, write_doc

DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m faults", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the CI subset (scenarios marked quick)")
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    parser.add_argument("--group", choices=GROUPS, help="one group of scenarios")
    parser.add_argument("--write-doc", action="store_true", help=f"write {DOC.relative_to(DOC.parents[1])}")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--clients", type=int, default=50, help="acknowledging clients (default 50)")
    args = parser.parse_args(argv)

    scenarios = load_scenarios()
    only = [n.strip() for n in args.only.split(",") if n.strip()] or None
    chosen = select(scenarios, quick=args.quick, only=only, group=args.group)
    if args.list:
        for sc in chosen:
            print(f"{sc.name:40} {'quick' if sc.quick else '     '} {sc.doc}")
        return 0
    if not chosen:
        print("faults: no scenario selected", file=sys.stderr)
        return 2
    command = "python -m faults " + " ".join(argv if argv is not None else sys.argv[1:])
    started = dt.datetime.now(dt.UTC)
    began = time.monotonic()
    facts = machine_facts()
    print(f"faults: {len(chosen)} scenario(s); {facts['cpu']}; {facts['uptime']}", flush=True)

    from faults.deployment import Deployment

    results: list = []

    def document(state: str) -> None:
        if args.write_doc and results:
            write_doc(DOC, results, command=command.strip(), started=started,
                      load_before=facts["uptime"], load_after=machine_facts()["uptime"],
                      cpu=facts["cpu"], total_s=time.monotonic() - began, planned=chosen,
                      revision=source_revision(), state=state)

    try:
        with Deployment.up(clients=args.clients, quick=args.quick) as dep:
            print(f"faults: deployment up in {time.monotonic() - began:.0f} s", flush=True)
            run(dep, chosen, results=results, after_each=lambda _: document("running"))
    except KeyboardInterrupt:
        document("interrupted")
        print(f"faults: interrupted after {len(results)} of {len(chosen)} scenarios; everything "
              "started was stopped", file=sys.stderr)
        return 130
    total_s = time.monotonic() - began
    broken = [r for r in results if not r.held]
    print(f"faults: {len(results) - len(broken)}/{len(results)} scenarios held in "
          f"{total_s / 60:.1f} min" + (f"; NOT held: {', '.join(r.scenario.name for r in broken)}"
                                       if broken else ""), flush=True)
    if args.write_doc:
        document("complete")
        print(f"faults: wrote {DOC}", flush=True)
    return 1 if broken else 0


def source_revision() -> str:
    """The commit the suite runs from (FAULTS_SOURCE_REVISION for an exported tree)."""
    import os
    import subprocess

    if revision := os.environ.get("FAULTS_SOURCE_REVISION"):
        return revision
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=DOC.parents[1],
                            capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
