"""Hooks on Django's own user model and login: closing WebSockets whose credential went.

The user model and ``logout`` are Django's, so a signal is the one place that sees every
deactivation (admin, shell, a management command) and every logout.
"""

from django.contrib.auth import get_user_model
from django.contrib.auth.signals import user_logged_out
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from accounts import services
from accounts.models import ApiToken

User = get_user_model()


@receiver(post_save, sender=User, dispatch_uid="accounts.user_deactivated")
def _user_saved(sender, instance, **kwargs) -> None:
    if not instance.is_active:
        services.user_close_websockets(user_id=instance.pk, reason="user deactivated")


@receiver(post_delete, sender=User, dispatch_uid="accounts.user_deleted")
def _user_deleted(sender, instance, **kwargs) -> None:
    services.user_close_websockets(user_id=instance.pk, reason="user deleted")


@receiver(post_delete, sender=ApiToken, dispatch_uid="accounts.apitoken_deleted")
def _token_deleted(sender, instance, **kwargs) -> None:
    services.apitoken_revoke(token=instance)


@receiver(user_logged_out, dispatch_uid="accounts.logged_out")
def _logged_out(sender, request, user, **kwargs) -> None:
    session_key = getattr(getattr(request, "session", None), "session_key", None)
    if session_key:
        services.session_close_websockets(session_key=session_key)
