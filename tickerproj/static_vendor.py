"""Serves the few browser files the pages use out of ``node_modules`` as static files.

The charting library comes from npm (``package.json`` + ``package-lock.json``, installed by
``make install``) and is never committed. A plain ``STATICFILES_DIRS`` entry would publish (and
``collectstatic`` copy) the whole 50 MB package; this finder exposes only the files named in
``settings.STATIC_VENDOR_FILES`` (static path -> file under ``node_modules``).
"""

from pathlib import Path

from django.conf import settings
from django.contrib.staticfiles.finders import BaseFinder
from django.core.checks import Warning
from django.core.files.storage import FileSystemStorage


class VendorFinder(BaseFinder):
    """A static-files finder for ``settings.STATIC_VENDOR_FILES``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.files: dict[str, Path] = {
            path: Path(source) for path, source in settings.STATIC_VENDOR_FILES.items()
        }

    def check(self, **kwargs):
        # A warning, not an error: an engine-only host (runticker, Celery) needs no page files.
        return [
            Warning(
                f"{source} is missing: the page at / cannot draw its charts without it",
                hint="run `make install` (npm ci installs package-lock.json)",
                id="tickerproj.W001",
            )
            for source in self.files.values()
            if not source.is_file()
        ]

    def find(self, path, find_all=False, **kwargs):
        source = self.files.get(path)
        if source is None or not source.is_file():
            return [] if find_all else None
        return [str(source)] if find_all else str(source)

    def list(self, ignore_patterns):
        for path, source in self.files.items():
            if source.is_file():
                storage = FileSystemStorage(location=source.parent)
                storage.prefix = str(Path(path).parent)
                yield source.name, storage
