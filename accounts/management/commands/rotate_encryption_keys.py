"""Re-encrypt stored secrets under the newest key of FIELD_ENCRYPTION_KEYS."""

from django.core.management.base import BaseCommand, CommandError

from accounts.fields import DecryptionError
from accounts.services import secrets_rotate_encryption_keys


class Command(BaseCommand):
    help = (
        "Put the new Fernet key first in FIELD_ENCRYPTION_KEYS (keep the old ones after it), "
        "run this, then drop the old keys."
    )

    def handle(self, *args, **options):
        try:
            rewritten = secrets_rotate_encryption_keys()
        except DecryptionError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"re-encrypted secrets of {rewritten} account(s) under the newest key")
