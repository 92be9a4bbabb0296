"""docs/http-api.md lists exactly the operations of /api/v1/openapi.json."""

import re
from pathlib import Path

import orjson
import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "http-api.md"
ROW = re.compile(r"^\| `(GET|POST|PUT|PATCH|DELETE)` \| `(/api/v1/[^`]*)` \|", re.MULTILINE)


@pytest.mark.django_db
def test_the_endpoint_table_matches_the_served_schema(admin_client):
    schema = orjson.loads(admin_client.get("/api/v1/openapi.json").content)
    served = {(method.upper(), path) for path, ops in schema["paths"].items() for method in ops}
    documented = set(ROW.findall(DOC.read_text()))
    assert documented == served
    text = DOC.read_text()
    for method, path in served:
        # Every endpoint has a curl example.
        pattern = re.escape(f"$H{path}").replace(r"\{", "{").replace(r"\}", "}")
        pattern = re.sub(r"\{[^}]+\}", r"[^/?\"]+", pattern) + r'[?"]'
        assert re.search(pattern, text), f"no curl example for {method} {path}"
