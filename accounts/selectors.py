"""Reads of broker accounts and API tokens."""

from django.db.models import Q, QuerySet
from django.utils import timezone

from accounts.models import ApiToken, KiteAccount


def account_list_streamable() -> QuerySet[KiteAccount]:
    """Accounts the engine may stream: active, with a token that has not expired."""
    now = timezone.now()
    return (
        KiteAccount.objects.filter(status=KiteAccount.Status.ACTIVE)
        .exclude(access_token="")
        .filter(Q(token_expires_at__isnull=True) | Q(token_expires_at__gt=now))
        .order_by("pk")
    )


def account_list_needing_login() -> QuerySet[KiteAccount]:
    """Accounts that are not disabled but have no usable session."""
    now = timezone.now()
    return (
        KiteAccount.objects.exclude(status=KiteAccount.Status.DISABLED)
        .filter(
            Q(status=KiteAccount.Status.SESSION_EXPIRED)
            | Q(access_token="")
            | Q(token_expires_at__lte=now)
        )
        .order_by("label")
    )


def apitoken_get_active(*, key: str) -> ApiToken | None:
    """The unrevoked token whose key hashes to the stored hash, if any."""
    return (
        ApiToken.objects.select_related("user")
        .filter(key_hash=ApiToken.hash_key(key), revoked_at__isnull=True, user__is_active=True)
        .first()
    )
