"""The project installs on Python 3.11, 3.12 and 3.13: the lock has a wheel or an sdist of every
locked package for each of them, so `make install` works on a machine whose python3 is any of
the three."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUPPORTED = ("3.11", "3.12", "3.13")


def _lock():
    return tomllib.loads((ROOT / "uv.lock").read_text())


def test_requires_python_admits_every_supported_version():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11,<3.14"
    assert _lock()["requires-python"] == ">=3.11, <3.14"


def _installs_on(package: dict, minor: str) -> bool:
    """A pure or abi3 wheel, an sdist, or a CPython wheel for ``minor`` on Linux x86-64."""
    if "sdist" in package or package.get("source", {}).get("virtual"):
        return True
    tag = "cp" + minor.replace(".", "")
    for wheel in package.get("wheels", []):
        name = wheel["url"].rsplit("/", 1)[-1]
        python_tag, abi_tag, platform_tag = name[:-4].split("-")[-3:]
        linux = platform_tag == "any" or re.search(r"linux.*x86_64", platform_tag)
        if not linux:
            continue
        if python_tag.startswith("py3") or abi_tag == "abi3":
            return True
        if tag in python_tag.split("."):
            return True
    return False


def _windows_only(package: dict) -> bool:
    """Locked for Windows markers only (pywin32): never installed on the Linux servers."""
    wheels = package.get("wheels", [])
    return "sdist" not in package and bool(wheels) and all("-win" in w["url"] for w in wheels)


def test_every_locked_package_installs_on_every_supported_version():
    missing = [
        f"{package['name']} {package['version']} on {minor}"
        for package in _lock()["package"]
        if ("wheels" in package or "sdist" in package) and not _windows_only(package)
        for minor in SUPPORTED
        if not _installs_on(package, minor)
    ]
    assert missing == []
