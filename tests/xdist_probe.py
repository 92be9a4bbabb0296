"""Run by tests/test_xdist_isolation.py (not collected otherwise: the name is not test_*.py).

Each test writes what its worker, and a manage.py-like subprocess started the way the runtime
tests start runticker and daphne, see: database, Redis database, layer prefix, var/, a port.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

from tests.helpers import free_port
from tests.streaming.engine.runtime_helpers import REPO, subprocess_env

SETTINGS_SEEN = """
import json, os
import django
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tickerproj.settings")
django.setup()
from django.conf import settings
print(json.dumps({"database": settings.DATABASES["default"]["NAME"], "redis_url": settings.REDIS_URL,
                  "prefix": settings.CHANNEL_LAYER_PREFIX, "var_dir": str(settings.VAR_DIR)}))
"""


@pytest.mark.django_db
@pytest.mark.parametrize("n", [1, 2])
def test_record_what_this_worker_sees(n):
    child = subprocess.run([sys.executable, "-c", SETTINGS_SEEN], cwd=REPO, env=subprocess_env(),
                           capture_output=True, text=True, timeout=120, check=True)
    seen = {
        "worker": os.environ.get("PYTEST_XDIST_WORKER", ""),
        "database": connection.settings_dict["NAME"],
        "redis_url": settings.REDIS_URL,
        "prefix": settings.CHANNEL_LAYER_PREFIX,
        "var_dir": str(settings.VAR_DIR),
        "port": free_port(),
        "subprocess": json.loads(child.stdout),
    }
    (Path(os.environ["PROBE_OUT"]) / f"{n}.json").write_text(json.dumps(seen))
