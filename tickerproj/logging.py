"""structlog set-up shared by every process: JSON events in production, readable in DEBUG.

Secrets are kept out of the output twice: fields named like a secret are replaced before
rendering (:func:`redact_secrets`), and every rendered line, tracebacks included, goes last
through :class:`SecretScrubber`, which replaces every secret value this process has handled
(Kite access tokens and API secrets when decrypted, API keys when hashed: see
:func:`remember_secret`) and anything shaped like a credential in a URL or header.
"""

import logging
import logging.config
import re
import threading
from typing import Final

import structlog

SECRET_KEYS = frozenset(
    {"access_token", "api_secret", "request_token", "password", "token", "authorization", "key"}
)


def redact_secrets(_logger, _method, event_dict):
    """Defence in depth: drop any field named like a secret before it is rendered."""
    for key in SECRET_KEYS.intersection(event_dict):
        event_dict[key] = "[redacted]"
    return event_dict


SCRUBBED: Final = "[scrubbed]"
MIN_SECRET_CHARS: Final = 8
"""Shorter values are not scrubbed: replacing them would garble ordinary text."""
_TOKEN_RUN: Final = re.compile(rf"[A-Za-z0-9_\-]{{{MIN_SECRET_CHARS},}}")
# Credentials by shape, whether or not their value is known: Kite's URL query and REST header,
# the WebSocket API's header and subprotocol.
_CREDENTIAL_SHAPES: Final = re.compile(
    r"(?P<head>(?:access_token|api_secret|request_token|checksum)=|"
    r"(?:authorization|Authorization)[\"']?\s*[:=]\s*[\"']?(?:token|Token|Bearer|bearer)\s+"
    r"(?:[A-Za-z0-9_\-]+:)?|tickerproj\.token\.)"
    r"[^&\s'\",;]+"
)


class _NewestValues:
    """A set that keeps its newest ``limit`` values (the oldest is dropped first)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._values: dict[str, None] = {}  # insertion-ordered

    def add(self, value: str) -> None:
        self._values.pop(value, None)
        self._values[value] = None
        while len(self._values) > self._limit:
            del self._values[next(iter(self._values))]

    def __contains__(self, value: object) -> bool:
        return value in self._values

    def __len__(self) -> int:
        return len(self._values)

    def snapshot(self) -> list[str]:
        return list(self._values)


class SecretScrubber:
    """Replaces known secret values and credential-shaped text in rendered log lines.

    Values are matched as whole runs of ``[A-Za-z0-9_-]`` (what Kite tokens and our API keys
    are made of) through set lookups per run, so a line costs the same whatever the number of
    values; a held secret with other characters is replaced literally. Held secrets (Kite's,
    read from our database) and presented ones (API keys as clients send them, strangers'
    included) are kept apart, each bounded with the oldest evicted first, so a flood of
    made-up keys can neither grow the scrubber nor push a Kite token out of it.
    """

    def __init__(self, *, max_held: int = 1024, max_presented: int = 4096) -> None:
        self._held = _NewestValues(max_held)
        self._held_literal = _NewestValues(64)
        self._presented = _NewestValues(max_presented)
        self._lock = threading.Lock()

    def remember(self, value: str, *, presented: bool = False) -> None:
        """Scrub ``value`` from now on; ``presented``: it came from a client, maybe a stranger."""
        if not isinstance(value, str) or len(value) < MIN_SECRET_CHARS:
            return
        run = _TOKEN_RUN.fullmatch(value) is not None
        if presented:
            if not run:
                return  # not one of our keys' shape; caught by _CREDENTIAL_SHAPES if anywhere
            store = self._presented
        else:
            store = self._held if run else self._held_literal
        with self._lock:
            store.add(value)

    def scrub(self, text: str) -> str:
        text = _CREDENTIAL_SHAPES.sub(lambda m: m.group("head") + SCRUBBED, text)
        held, presented = self._held, self._presented
        if held or presented:
            text = _TOKEN_RUN.sub(
                lambda m: SCRUBBED if m.group() in held or m.group() in presented else m.group(),
                text,
            )
        with self._lock:
            literal = self._held_literal.snapshot()
        for value in literal:
            text = text.replace(value, SCRUBBED)
        return text

    def __call__(self, _logger, _method, rendered):
        """The last processor: scrubs the rendered line (a str, or bytes from orjson)."""
        if isinstance(rendered, bytes):
            return self.scrub(rendered.decode("utf-8", "replace")).encode()
        return self.scrub(rendered) if isinstance(rendered, str) else rendered


# One per process, like the logging configuration it belongs to (stdlib logging and structlog
# are process-wide): the places that handle secrets hand their values to it.
SCRUBBER: Final = SecretScrubber()


def remember_secret(value: str, *, presented: bool = False) -> None:
    """Make sure ``value`` never appears in this process's log output (see SecretScrubber)."""
    SCRUBBER.remember(value, presented=presented)


def configure_logging(*, json: bool, level: str) -> None:
    """Route stdlib and structlog logs through one structlog renderer.

    Context travels as fields (account, instrument_token, task), never interpolated into
    the message, so logs stay queryable.
    """
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets,
    ]
    renderer = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {
                "structlog": {
                    "()": structlog.stdlib.ProcessorFormatter,
                    "processors": [
                        structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                        structlog.processors.format_exc_info,
                        renderer,
                        SCRUBBER,
                    ],
                    "foreign_pre_chain": shared,
                }
            },
            "handlers": {
                "console": {"class": "logging.StreamHandler", "formatter": "structlog"}
            },
            "root": {"handlers": ["console"], "level": level},
            "loggers": {
                "django.db.backends": {"level": "INFO"},
                "daphne": {"level": "WARNING"},
                "asyncio": {"level": "WARNING"},
                # django-axes logs every successful login's reset at INFO.
                "axes": {"level": "WARNING"},
            },
        }
    )
    # Python warnings (Celery's root-user SecurityWarning, deprecations) as log events, not raw
    # stderr text between the JSON lines.
    logging.captureWarnings(True)
    structlog.configure(
        processors=[
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
