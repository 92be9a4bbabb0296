"""The engine's database reads: one unreadable secret takes out its account, not the engine."""

import pytest
from cryptography.fernet import Fernet
from structlog.testing import capture_logs

from accounts.models import KiteAccount
from accounts.services import UNREADABLE_CIPHER_ERROR
from streaming.engine.store import world_load

pytestmark = pytest.mark.django_db


def test_an_undecryptable_access_token_makes_only_its_account_unstreamable(settings):
    good = KiteAccount.objects.create(label="good", api_key="k1", access_token="tok-good")
    keys = list(settings.FIELD_ENCRYPTION_KEYS)
    # Stored under a key the engine does not have (a lost or mistyped key).
    settings.FIELD_ENCRYPTION_KEYS = [Fernet.generate_key().decode()]
    lost = KiteAccount.objects.create(label="lost", api_key="k2", access_token="tok-lost-secret")
    settings.FIELD_ENCRYPTION_KEYS = keys

    with capture_logs() as logs:
        world = world_load()

    rows = {a.label: a for a in world.accounts}
    assert rows["good"].streamable and rows["good"].access_token == "tok-good"
    assert not rows["lost"].streamable
    assert rows["lost"].access_token == ""
    assert rows["lost"].status == KiteAccount.Status.ERROR
    lost.refresh_from_db(fields=["status", "last_error"])
    assert lost.status == KiteAccount.Status.ERROR
    assert lost.last_error == UNREADABLE_CIPHER_ERROR
    good.refresh_from_db(fields=["status"])
    assert good.status == KiteAccount.Status.ACTIVE
    events = [e for e in logs if e["event"] == "engine.account_secret_unreadable"]
    assert [e["account"] for e in events] == ["lost"]
    assert "tok-lost-secret" not in repr(logs)

    # The next load does not try (or log) again: the account is in error until fixed.
    with capture_logs() as logs:
        world = world_load()
    assert not {a.label: a for a in world.accounts}["lost"].streamable
    assert not [e for e in logs if e["event"] == "engine.account_secret_unreadable"]
