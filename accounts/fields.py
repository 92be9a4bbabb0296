"""Encrypted model fields on cryptography's MultiFernet, with key rotation.

The database holds Fernet tokens. An instance holds the token (a ``Ciphertext``) until the
attribute is read, so a wrong key fails at the read with the model, field and primary key
named, and the ciphertext is never handed out as if it were the secret.
"""

from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import models

from tickerproj.logging import remember_secret


class Ciphertext(str):
    """A Fernet token read from the database, not yet decrypted."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "Ciphertext(…)"


class DecryptionError(Exception):
    """A stored secret cannot be decrypted with any configured key."""

    def __init__(self, *, model: str, field: str, pk) -> None:
        self.model, self.field, self.pk = model, field, pk
        super().__init__(
            f"cannot decrypt {model}.{field} for pk={pk}: no key in FIELD_ENCRYPTION_KEYS "
            "matches (wrong or missing key; add the old key after the new one and run "
            "`manage.py rotate_encryption_keys`)"
        )


@lru_cache(maxsize=4)
def _multifernet(keys: tuple[str, ...]) -> MultiFernet:
    try:
        return MultiFernet([Fernet(key.encode()) for key in keys])
    except ValueError as exc:
        raise ImproperlyConfigured(
            f"FIELD_ENCRYPTION_KEYS holds an invalid Fernet key ({exc})"
        ) from exc


def field_cipher() -> MultiFernet:
    """The MultiFernet for the configured keys: the first encrypts, all decrypt."""
    return _multifernet(tuple(settings.FIELD_ENCRYPTION_KEYS))


class _EncryptedAttribute:
    """Decrypts on read with the instance at hand, so errors can name its primary key."""

    def __init__(self, field: "EncryptedTextField") -> None:
        self.field = field

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        value = instance.__dict__.get(self.field.attname)
        if isinstance(value, Ciphertext):
            try:
                secret = field_cipher().decrypt(value.encode()).decode()
            except InvalidToken:
                raise DecryptionError(
                    model=instance._meta.label, field=self.field.name, pk=instance.pk
                ) from None
            # Whoever reads a secret may log an error holding it: the log scrubber knows it.
            remember_secret(secret)
            return secret
        return value

    def __set__(self, instance, value) -> None:
        if isinstance(value, str) and not isinstance(value, Ciphertext):
            remember_secret(value)
        instance.__dict__[self.field.attname] = value


class EncryptedTextField(models.TextField):
    """A text secret stored encrypted; blank means "not set"."""

    def contribute_to_class(self, cls, name, private_only=False):
        super().contribute_to_class(cls, name, private_only)
        setattr(cls, self.attname, _EncryptedAttribute(self))

    def from_db_value(self, value, expression, connection):
        if value in (None, ""):
            return value
        return Ciphertext(value)

    def get_prep_value(self, value):
        if value in (None, "") or isinstance(value, Ciphertext):
            return value
        return field_cipher().encrypt(str(value).encode()).decode()

    def value_from_object(self, obj):
        # Serialisers and forms see the stored token, never the plaintext.
        value = obj.__dict__.get(self.attname)
        if value in (None, "") or isinstance(value, Ciphertext):
            return value
        return Ciphertext(self.get_prep_value(value))


def rotate_ciphertext(value: str) -> str:
    """Re-encrypt a stored token under the newest key (MultiFernet.rotate)."""
    return field_cipher().rotate(value.encode()).decode()
