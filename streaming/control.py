"""Tell running engines that subscriptions or accounts changed, so they reload within 2 s.

With Redis configured the notice is a PUBLISH on the installation's control channel that every
runticker process of it listens to; on embedded defaults (one process, no Redis) it goes to the listeners registered
in this process. Engines coalesce bursts, so a thousand notices cause one reload.
"""

import threading
from collections.abc import Callable

import redis
import structlog
from django.apps import apps
from django.db import transaction

from tickerproj.redis_connection import redis_client

log = structlog.get_logger(__name__)

RELOAD_MESSAGE = b"reload"


def control_channel(prefix: str) -> str:
    """The Redis pub/sub channel one installation's engines listen on.

    ``prefix`` is the CHANNEL_LAYER_PREFIX setting: pub/sub ignores Redis db numbers, so a
    fixed name would let every installation (or test run) on a Redis server reload the others.
    """
    if not prefix:
        raise ValueError("the control channel needs a non-empty prefix")
    return f"{prefix}:engine:control"


class ChangeNotifier:
    """Sends reload notices to engines: by Redis when a URL is given, else in-process."""

    def __init__(self, *, redis_url: str = "", channel: str = "") -> None:
        if redis_url and not channel:
            raise ValueError("a Redis notifier needs its control channel")
        self._redis = redis_client(redis_url) if redis_url else None
        self._channel = channel
        self._listeners: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def add_local_listener(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Register an in-process listener (embedded mode); returns a function that removes it."""
        with self._lock:
            self._listeners.append(listener)

        def remove() -> None:
            with self._lock:
                self._listeners.remove(listener)

        return remove

    def notify(self) -> None:
        if self._redis is not None:
            try:
                self._redis.publish(self._channel, RELOAD_MESSAGE)
            except redis.RedisError as exc:
                # The engines also reload on their periodic reconciliation; a lost notice
                # delays a change, it does not lose it.
                log.warning("engine.notify_failed", error=str(exc))
            return
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            listener()


def notify_engines_on_commit() -> None:
    """After the current transaction commits, tell running engines to reload.

    The notifier lives on the streaming app config, built once from settings in ready().
    """
    notifier: ChangeNotifier = apps.get_app_config("streaming").change_notifier
    transaction.on_commit(notifier.notify)
