"""The house's import rules, read from the source: imports run one way, down.

- no production module imports the Kite simulator but the demo, ``kitesim`` and ``replay``
  commands, and the synthetic market imports nothing of it;
- models, services and selectors never import the engine or the Celery app;
- only services tell the engines (``notify_engines_on_commit``).
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tickerproj", "streaming", "subscriptions", "accounts")


def production_modules() -> dict[str, ast.Module]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            modules[path.relative_to(ROOT).as_posix()] = ast.parse(path.read_text(), str(path))
    return modules


def imported(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def imports_any(tree: ast.Module, prefixes: tuple[str, ...]) -> set[str]:
    return {n for n in imported(tree) if any(n == p or n.startswith(p + ".") for p in prefixes)}


def test_only_the_demo_kitesim_and_replay_import_the_simulator():
    allowed = {
        "streaming/management/commands/demo.py",
        "streaming/management/commands/kitesim.py",
        "streaming/management/commands/replay.py",
    }
    offenders = {
        path: found
        for path, tree in production_modules().items()
        if not path.startswith("streaming/sim/") and path not in allowed
        and (found := imports_any(tree, ("streaming.sim",)))
    }
    assert offenders == {}


def test_the_synthetic_market_imports_nothing_of_the_simulator():
    tree = production_modules()["streaming/market.py"]
    assert imports_any(tree, ("streaming.sim",)) == set()


def test_models_services_and_selectors_never_import_the_engine_or_celery_app():
    lower = ("models.py", "services.py", "selectors.py")
    offenders = {
        path: found
        for path, tree in production_modules().items()
        if path.endswith(lower)
        and (found := imports_any(tree, ("streaming.engine", "tickerproj.celery")))
    }
    assert offenders == {}


def test_only_services_tell_the_engines():
    callers = set()
    for path, tree in production_modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "notify_engines_on_commit":
                callers.add(path)
    assert callers == {"accounts/services.py", "subscriptions/services.py"}


def test_no_production_module_imports_the_fault_suite_or_the_tests():
    offenders = {
        path: found
        for path, tree in production_modules().items()
        if (found := imports_any(tree, ("faults", "tests")))
    }
    assert offenders == {}
