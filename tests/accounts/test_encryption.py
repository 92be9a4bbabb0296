"""Secrets at rest: encrypted in the database, rotatable, and loud about a wrong key."""

import pytest
from cryptography.fernet import Fernet
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from accounts.fields import DecryptionError
from accounts.models import KiteAccount

pytestmark = pytest.mark.django_db


def _raw_columns(pk: int) -> tuple[str, str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT api_secret, access_token FROM accounts_kiteaccount WHERE id = %s", [pk])
        return cursor.fetchone()


def _account() -> KiteAccount:
    return KiteAccount.objects.create(
        label="primary", api_key="key1", api_secret="s3cret-api", access_token="tok-123"
    )


def test_secrets_are_stored_encrypted_and_read_back():
    account = _account()
    raw_secret, raw_token = _raw_columns(account.pk)
    assert "s3cret-api" not in raw_secret and "tok-123" not in raw_token
    fresh = KiteAccount.objects.get(pk=account.pk)
    assert fresh.api_secret == "s3cret-api"
    assert fresh.access_token == "tok-123"


def test_resaving_a_loaded_account_does_not_double_encrypt():
    account = _account()
    loaded = KiteAccount.objects.get(pk=account.pk)
    loaded.kite_user_id = "AB1234"
    loaded.save()
    assert KiteAccount.objects.get(pk=account.pk).api_secret == "s3cret-api"


def test_repr_and_str_hide_secrets():
    account = KiteAccount.objects.get(pk=_account().pk)
    assert "s3cret" not in repr(account) and "tok-123" not in repr(account)
    assert "s3cret" not in str(account)


def test_rotation_re_encrypts_under_the_new_key_and_everything_reads_back(settings):
    account = _account()
    KiteAccount.objects.create(label="second", api_key="key2", api_secret="other-secret")
    old_key = settings.FIELD_ENCRYPTION_KEYS[0]
    new_key = Fernet.generate_key().decode()
    before = _raw_columns(account.pk)

    settings.FIELD_ENCRYPTION_KEYS = [new_key, old_key]
    call_command("rotate_encryption_keys")
    after = _raw_columns(account.pk)
    assert after != before

    # Only the new key is needed from now on.
    settings.FIELD_ENCRYPTION_KEYS = [new_key]
    assert KiteAccount.objects.get(pk=account.pk).api_secret == "s3cret-api"
    assert KiteAccount.objects.get(pk=account.pk).access_token == "tok-123"
    assert KiteAccount.objects.get(label="second").api_secret == "other-secret"
    assert KiteAccount.objects.get(label="second").access_token == ""


def test_wrong_key_names_model_field_and_pk_and_never_returns_ciphertext(settings):
    account = _account()
    settings.FIELD_ENCRYPTION_KEYS = [Fernet.generate_key().decode()]
    loaded = KiteAccount.objects.get(pk=account.pk)
    with pytest.raises(DecryptionError) as excinfo:
        _ = loaded.access_token
    message = str(excinfo.value)
    assert "accounts.KiteAccount.access_token" in message
    assert f"pk={account.pk}" in message
    raw_token = _raw_columns(account.pk)[1]
    assert raw_token not in message


def test_rotation_with_a_wrong_key_fails_clearly_and_changes_nothing(settings):
    account = _account()
    before = _raw_columns(account.pk)
    settings.FIELD_ENCRYPTION_KEYS = [Fernet.generate_key().decode()]
    with pytest.raises(CommandError, match=rf"accounts.KiteAccount.api_secret for pk={account.pk}"):
        call_command("rotate_encryption_keys")
    assert _raw_columns(account.pk) == before


@pytest.mark.django_db
def test_a_decrypted_secret_is_scrubbed_from_the_logs():
    from tickerproj.logging import SCRUBBER

    account = KiteAccount.objects.create(label="scrub", api_key="kscrub")
    # Stored through the field (encrypted) without passing through the model attribute.
    KiteAccount.objects.filter(pk=account.pk).update(access_token="DecryptedOnlyToken4242")
    assert "DecryptedOnlyToken4242" in SCRUBBER.scrub("DecryptedOnlyToken4242")
    assert KiteAccount.objects.get(pk=account.pk).access_token == "DecryptedOnlyToken4242"
    assert SCRUBBER.scrub("error: DecryptedOnlyToken4242 expired") == "error: [scrubbed] expired"
