"""The charting library is served from node_modules (``make install``: npm ci), one file only."""

from pathlib import Path

from django.contrib.staticfiles import finders
from django.core.management import call_command

from tickerproj.static_vendor import VendorFinder

ROOT = Path(__file__).resolve().parents[1]
ECHARTS = "vendor/echarts/echarts.min.js"


def test_the_page_finds_echarts_in_node_modules_from_the_lock():
    found = Path(finders.find(ECHARTS))
    assert found == ROOT / "node_modules" / "echarts" / "dist" / "echarts.min.js"
    assert found.stat().st_size > 100_000
    assert VendorFinder().check() == []


def test_collectstatic_copies_only_the_named_file_of_the_package(settings, tmp_path):
    settings.STATIC_ROOT = tmp_path / "static"
    call_command("collectstatic", "--noinput", verbosity=0)
    vendor = sorted(p.relative_to(settings.STATIC_ROOT).as_posix()
                    for p in (settings.STATIC_ROOT / "vendor").rglob("*") if p.is_file())
    assert vendor == [ECHARTS]


def test_a_missing_install_is_a_warning_that_says_what_to_run(settings, tmp_path):
    settings.STATIC_VENDOR_FILES = {ECHARTS: tmp_path / "node_modules" / "echarts.min.js"}
    finder = VendorFinder()
    (warning,) = finder.check()
    assert warning.id == "tickerproj.W001" and "make install" in warning.hint
    assert finder.find(ECHARTS) is None and finder.find(ECHARTS, find_all=True) == []
    assert list(finder.list(None)) == []
