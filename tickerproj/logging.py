"""structlog set-up shared by every process: JSON events in production, readable in DEBUG."""

import logging
import logging.config

import structlog

SECRET_KEYS = frozenset(
    {"access_token", "api_secret", "request_token", "password", "token", "authorization", "key"}
)


def redact_secrets(_logger, _method, event_dict):
    """Defence in depth: drop any field named like a secret before it is rendered."""
    for key in SECRET_KEYS.intersection(event_dict):
        event_dict[key] = "[redacted]"
    return event_dict


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
