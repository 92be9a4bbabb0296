"""PostgreSQL waits are bounded: connect, statement, dead peer, and pooled connections checked."""

import os

import pytest
from django.conf import settings
from django.db import connection


def test_every_wait_on_postgresql_is_bounded():
    options = settings.DATABASES["default"]["OPTIONS"]
    assert options["connect_timeout"] == 5
    assert options["keepalives"] == 1 and options["tcp_user_timeout"] == 30_000
    # With the pool, Django passes psycopg_pool's check_connection: a dropped one is replaced.
    assert settings.DATABASES["default"]["CONN_HEALTH_CHECKS"] is True


@pytest.mark.django_db
def test_the_statement_timeout_reaches_the_server():
    with connection.cursor() as cursor:
        cursor.execute("SHOW statement_timeout")
        (value,) = cursor.fetchone()
    expected_s = int(os.environ.get("DATABASE_STATEMENT_TIMEOUT_S", "60"))
    assert value == ("1min" if expected_s == 60 else f"{expected_s}s")
