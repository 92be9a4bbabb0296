"""The eight callers of the security scenarios, made in the private database through the ORM.

anonymous; three non-staff users each with a token of one scope (read, subscribe, trade);
view-only staff (every ``view_*`` permission, nothing else); staff (every permission, not a
superuser); a superuser; and a revoked token (every scope, revoked before use). Sessions are
made the way Django's login makes them (the session store of ``SESSION_ENGINE``), so daphne
reads them as real browser sessions; a fixed CSRF secret goes in the cookie and the header.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from importlib import import_module

SCOPES = ("read", "subscribe", "trade")
CSRF_SECRET_LENGTH = 32


@dataclass(frozen=True)
class Identity:
    """One caller: how it authenticates, and what the policy knows about it."""

    name: str
    kind: str  # "anonymous" | "token" | "session"
    user_id: int | None = None
    token_key: str = field(default="", repr=False)
    token_id: int | None = None
    scopes: frozenset[str] = frozenset()
    revoked: bool = False
    is_staff: bool = False
    is_superuser: bool = False
    permissions: frozenset[str] = frozenset()  # "app_label.codename" (sessions only)
    session_key: str = field(default="", repr=False)
    csrf_secret: str = field(default="", repr=False)

    @property
    def active_token(self) -> bool:
        return self.kind == "token" and not self.revoked

    def has_scope(self, scope: str) -> bool:
        return self.active_token and scope in self.scopes

    def has_perm(self, perm: str) -> bool:
        return self.kind == "session" and (self.is_superuser or perm in self.permissions)

    def headers(self, *, csrf: bool = True) -> dict[str, str]:
        """Request headers: the token, or the session and CSRF cookies (and the CSRF header)."""
        if self.kind == "token":
            return {"Authorization": f"Token {self.token_key}"}
        if self.kind == "session":
            headers = {"Cookie": f"sessionid={self.session_key}; csrftoken={self.csrf_secret}"}
            if csrf:
                headers["X-CSRFToken"] = self.csrf_secret
            return headers
        return {}


def _session_for(user) -> str:
    """A logged-in session of ``user``, stored as django.contrib.auth.login stores one."""
    from django.conf import settings
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY

    store = import_module(settings.SESSION_ENGINE).SessionStore()
    store[SESSION_KEY] = str(user.pk)
    store[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    store[HASH_SESSION_KEY] = user.get_session_auth_hash()
    store.create()
    return store.session_key


def _user(username: str, **flags):
    from django.contrib.auth import get_user_model

    user_model = get_user_model()
    user_model.objects.filter(username=username).delete()
    return user_model.objects.create_user(
        username=username, password=secrets.token_urlsafe(24), **flags
    )


def _permission_names(user) -> frozenset[str]:
    return frozenset(user.get_all_permissions())


def identities_create(*, tag: str) -> list[Identity]:
    """The eight identities, their users named ``sec-<tag>-<name>`` (made anew each call)."""
    from django.contrib.auth.models import Permission

    from accounts.models import ApiToken
    from accounts.services import apitoken_create, apitoken_revoke

    made = [Identity(name="anonymous", kind="anonymous")]
    for scope in SCOPES:
        user = _user(f"sec-{tag}-{scope}")
        token, key = apitoken_create(user=user, name=f"security {scope}", scopes=[scope])
        made.append(Identity(name=f"token-{scope}", kind="token", user_id=user.pk,
                             token_key=key, token_id=token.pk, scopes=frozenset([scope])))
    for name, flags, perms in (
        ("viewonly-staff", {"is_staff": True}, Permission.objects.filter(codename__startswith="view_")),
        ("staff", {"is_staff": True}, Permission.objects.all()),
        ("superuser", {"is_staff": True, "is_superuser": True}, Permission.objects.none()),
    ):
        user = _user(f"sec-{tag}-{name}", **flags)
        user.user_permissions.set(perms)
        user = type(user).objects.get(pk=user.pk)  # a fresh object: no permission cache
        made.append(Identity(
            name=name, kind="session", user_id=user.pk, is_staff=True,
            is_superuser=user.is_superuser, permissions=_permission_names(user),
            session_key=_session_for(user), csrf_secret=secrets.token_hex(CSRF_SECRET_LENGTH // 2),
        ))  # fmt: skip
    user = _user(f"sec-{tag}-revoked")
    token, key = apitoken_create(user=user, name="security revoked", scopes=list(SCOPES))
    apitoken_revoke(token=ApiToken.objects.get(pk=token.pk))
    made.append(Identity(name="token-revoked", kind="token", user_id=user.pk, token_key=key,
                         token_id=token.pk, scopes=frozenset(SCOPES), revoked=True))
    return made
