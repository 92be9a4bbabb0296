"""Writes to broker accounts: sessions, status, API tokens, key rotation.

The only writers of an account's status; those that change what engines may stream tell them.
"""

import datetime as dt
from collections.abc import Iterable

import structlog
from cryptography.fernet import InvalidToken
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from accounts.fields import Ciphertext, DecryptionError, rotate_ciphertext
from accounts.models import ApiToken, KiteAccount, session_expiry_after
from accounts.revocation import ws_close_on_commit, ws_session_group, ws_token_group, ws_user_group
from streaming.control import notify_engines_on_commit

log = structlog.get_logger(__name__)

ENCRYPTED_FIELDS = ("api_secret", "access_token")


def account_set_session(
    *, account: KiteAccount, access_token: str, user_id: str = "", issued_at: dt.datetime | None = None
) -> KiteAccount:
    """Store a fresh access token, valid until 06:00 IST tomorrow.

    The account becomes active, unless it is disabled: a new session never re-enables an
    account someone chose to disable (enabling is its own, explicit step).
    Running engines are told after commit, so they reconnect with the new token.
    """
    issued_at = issued_at or timezone.now()
    account.access_token = access_token
    account.token_issued_at = issued_at
    account.token_expires_at = session_expiry_after(issued_at)
    if account.status != KiteAccount.Status.DISABLED:
        account.status = KiteAccount.Status.ACTIVE
    account.last_error = ""
    if user_id:
        account.kite_user_id = user_id
    with transaction.atomic():
        account.save()
        notify_engines_on_commit()
    log.info("account.session_set", account=account.label, expires_at=account.token_expires_at)
    return account


def account_save(*, account: KiteAccount) -> KiteAccount:
    """Save an account edited by hand (label, key, secret, status); the engines are told."""
    with transaction.atomic():
        account.save()
        notify_engines_on_commit()
    log.info("account.saved", account=account.label, status=account.status)
    return account


def accounts_set_status(*, account_ids: Iterable[int], status: str) -> int:
    """Enable or disable accounts in one UPDATE; returns how many changed."""
    with transaction.atomic():
        changed = (
            KiteAccount.objects.filter(pk__in=list(account_ids))
            .exclude(status=status)
            .update(status=status, updated_at=timezone.now())
        )
        if changed:
            notify_engines_on_commit()
    log.info("accounts.status_set", status=status, count=changed)
    return changed


def account_mark_session_expired(
    *, account_id: int, reason: str, token_issued_at: dt.datetime | None
) -> bool:
    """Mark an account's session expired (Kite said 403); True if this call changed it.

    ``token_issued_at`` is that of the token Kite refused: a late 403 for an old token must
    not expire the login that replaced it, so the UPDATE only matches that login.
    """
    changed = (
        KiteAccount.objects.filter(pk=account_id, token_issued_at=token_issued_at)
        .exclude(status__in=[KiteAccount.Status.SESSION_EXPIRED, KiteAccount.Status.DISABLED])
        .update(status=KiteAccount.Status.SESSION_EXPIRED, last_error=reason, updated_at=timezone.now())
    )
    if changed:
        log.warning("account.session_expired", account_id=account_id, reason=reason)
    return bool(changed)


UNREADABLE_CIPHER_ERROR = (
    "the stored access token cannot be decrypted with FIELD_ENCRYPTION_KEYS (wrong or missing "
    "key): restore the key, or log in to Kite again to store a new token"
)


def account_mark_secret_unreadable(*, account_id: int) -> bool:
    """Put an account whose access token cannot be decrypted in error; True if it changed."""
    changed = (
        KiteAccount.objects.filter(pk=account_id)
        .exclude(status__in=[KiteAccount.Status.ERROR, KiteAccount.Status.DISABLED])
        .update(
            status=KiteAccount.Status.ERROR,
            last_error=UNREADABLE_CIPHER_ERROR,
            updated_at=timezone.now(),
        )
    )
    if changed:
        log.error("account.secret_unreadable", account_id=account_id)
    return bool(changed)


def accounts_expire_sessions(*, now: dt.datetime | None = None) -> list[str]:
    """Mark every active account whose token has passed its expiry; returns their labels."""
    now = now or timezone.now()
    with transaction.atomic():
        expired = list(
            KiteAccount.objects.select_for_update()
            .filter(status=KiteAccount.Status.ACTIVE, token_expires_at__lte=now)
            .values_list("pk", "label")
        )
        KiteAccount.objects.filter(pk__in=[pk for pk, _ in expired]).update(
            status=KiteAccount.Status.SESSION_EXPIRED,
            last_error="access token expired at 06:00 IST; log in to Kite again",
            updated_at=now,
        )
        if expired:
            # Engines drop the expired accounts' connections instead of waiting for a 403.
            notify_engines_on_commit()
    labels = [label for _, label in expired]
    if labels:
        log.info("accounts.sessions_expired", accounts=labels)
    return labels


def apitoken_create(
    *, user, name: str, scopes: Iterable[str] = (ApiToken.Scope.READ,)
) -> tuple[ApiToken, str]:
    """Create an API token; the plain key is returned once and never stored."""
    scopes = sorted(set(scopes))
    unknown = set(scopes) - set(ApiToken.Scope.values)
    if unknown:
        raise ValueError(f"unknown scopes {sorted(unknown)}; expected some of {ApiToken.Scope.values}")
    key = ApiToken.new_key()
    token = ApiToken.objects.create(
        user=user,
        name=name,
        prefix=key[: ApiToken.PREFIX_LENGTH],
        key_hash=ApiToken.hash_key(key),
        scopes=scopes,
    )
    log.info("apitoken.created", user=user.get_username(), prefix=token.prefix, scopes=scopes)
    return token, key


def apitoken_revoke(*, token: ApiToken) -> None:
    """Revoke a token; its open WebSockets are closed once the revocation commits."""
    with transaction.atomic():
        ApiToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
        ws_close_on_commit(group=ws_token_group(token.pk), reason="api token revoked")
    log.info("apitoken.revoked", prefix=token.prefix)


def user_close_websockets(*, user_id: int, reason: str) -> None:
    """Close every WebSocket of a user (deactivated or deleted) once the change commits."""
    ws_close_on_commit(group=ws_user_group(user_id), reason=reason)
    log.info("user.websockets_closed", user_id=user_id, reason=reason)


def session_close_websockets(*, session_key: str) -> None:
    """Close the WebSockets a browser session opened (the user logged out)."""
    ws_close_on_commit(group=ws_session_group(session_key), reason="logged out")


def secrets_rotate_encryption_keys() -> int:
    """Re-encrypt every stored secret under the newest FIELD_ENCRYPTION_KEYS key.

    Returns the number of rows rewritten. Rows are updated with their raw column values, so
    the plaintext never passes through a model instance.
    """
    rewritten = 0
    with transaction.atomic():
        rows = KiteAccount.objects.select_for_update().values_list("pk", "api_secret", "access_token")
        for pk, *values in rows:
            changes = {}
            for name, value in zip(ENCRYPTED_FIELDS, values, strict=True):
                if not value:
                    continue
                try:
                    # Ciphertext so that .update() stores the token as it is.
                    changes[name] = Ciphertext(rotate_ciphertext(value))
                except InvalidToken:
                    raise DecryptionError(model=KiteAccount._meta.label, field=name, pk=pk) from None
            if changes:
                KiteAccount.objects.filter(pk=pk).update(**changes)
                rewritten += 1
    log.info("secrets.rotated", rows=rewritten)
    return rewritten


APITOKEN_TOUCH_INTERVAL_S = 60
"""last_used_at is refreshed at most this often, so that reconnect storms write little."""


def apitoken_mark_used(
    *, token_id: int, now: dt.datetime | None = None, last_used_at: dt.datetime | None = None
) -> bool:
    """Record that a token was used; True if this call wrote (throttled, one conditional UPDATE).

    ``last_used_at``: the value just read with the token, if known; when it is recent no
    UPDATE is sent at all (it would match nothing), saving a round trip per request.
    """
    now = now or timezone.now()
    stale_before = now - dt.timedelta(seconds=APITOKEN_TOUCH_INTERVAL_S)
    if last_used_at is not None and last_used_at >= stale_before:
        return False
    return bool(
        ApiToken.objects.filter(pk=token_id)
        .filter(Q(last_used_at__isnull=True) | Q(last_used_at__lt=stale_before))
        .update(last_used_at=now)
    )


class AccountLoginError(Exception):
    """A Kite login cannot be completed for a reason of ours (no secret, another Kite user)."""


def account_login_complete(*, account: KiteAccount, request_token: str, client) -> KiteAccount:
    """Finish a Kite login: exchange the request token for a session and store it.

    ``client`` is a ``streaming.kite.rest.KiteRestClient`` for the account's api key; its
    ``KiteError`` subclasses (an invalid or expired request token is a ``KiteTokenError``)
    propagate. A session for another Kite user than the one the account is bound to is
    refused, so an account never streams or trades on someone else's login. Running engines
    are told to reload, so they reconnect with the new token.
    """
    if client.api_key != account.api_key:
        raise ValueError(f"client is for api key {client.api_key}, account {account.label} uses {account.api_key}")
    if not account.api_secret_is_set:
        raise AccountLoginError(f"account {account.label} has no api secret: set it in the admin first")
    session = client.generate_session(request_token=request_token, api_secret=account.api_secret)
    if account.kite_user_id and session.user_id != account.kite_user_id:
        raise AccountLoginError(
            f"Kite logged in user {session.user_id}, but account {account.label} belongs to "
            f"{account.kite_user_id}: log in to Kite as {account.kite_user_id}"
        )
    # account_set_session tells the running engines, so they reconnect with the new token.
    account = account_set_session(
        account=account, access_token=session.access_token, user_id=session.user_id
    )
    log.info("account.login_completed", account=account.label, user_id=session.user_id)
    return account
