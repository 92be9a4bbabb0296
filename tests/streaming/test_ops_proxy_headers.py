"""daphne behind a proxy (``--proxy-headers``, as docs/security.md asks) with
``OPS_ALLOWED_NETWORKS``: a forged ``X-Forwarded-For`` naming an allowed address opens neither
``/metrics`` nor the details of ``/health`` (docs/security.md, M1).

daphne makes the first X-Forwarded-For entry the scope's client, so the address the access
check saw was the forged one; found by the fault suite (``security.ops_exposure``).
"""

import orjson
import pytest
import requests

from tests.helpers import free_port
from tests.streaming.wsutil import close_db_threads as close_db_threads
from tests.streaming.wsutil import daphne_process, service_env
from tests.streaming.wsutil import layer_prefix as layer_prefix

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("close_db_threads")]

OPS_TOKEN = "proxy-headers-ops-token-0123456789abcdef"


@pytest.fixture
def daphne(layer_prefix, tmp_path):
    port = free_port()
    env = service_env(layer_prefix=layer_prefix, LOG_LEVEL="WARNING", OPS_TOKEN=OPS_TOKEN,
                      OPS_ALLOWED_NETWORKS="10.0.0.0/8")
    server = daphne_process(port=port, env=env, log_dir=tmp_path)
    server.args.insert(server.args.index("tickerproj.asgi:application"), "--proxy-headers")
    server.start(port=port)
    yield f"http://127.0.0.1:{port}"
    server.stop()


def test_a_forged_forwarded_for_opens_nothing_behind_proxy_headers(daphne):
    forged = {"X-Forwarded-For": "10.1.2.3"}
    assert requests.get(f"{daphne}/metrics", headers=forged, timeout=30).status_code == 403
    health = requests.get(f"{daphne}/health", headers=forged, timeout=30)
    assert "engines" not in orjson.loads(health.content)
    # The ops token still opens both, forwarded or not.
    bearer = {**forged, "Authorization": f"Bearer {OPS_TOKEN}"}
    assert requests.get(f"{daphne}/metrics", headers=bearer, timeout=30).status_code == 200
    assert "engines" in orjson.loads(requests.get(f"{daphne}/health", headers=bearer, timeout=30).content)
