"""Secrets out of text: the one redaction every error and log line about Kite goes through."""

from __future__ import annotations

import re
from typing import Final

REDACT_MIN_CHARS: Final = 8
"""Kite's tokens and secrets are 32 characters; replacing a shorter value would garble text."""

# A WebSocket URL (``wss://...?api_key=...&access_token=...``) lands in exception texts.
_ACCESS_TOKEN_IN_TEXT: Final = re.compile(r"(access_token=)[^&\s'\"]*")


def redact(text: str, *secrets: str) -> str:
    """``text`` with ``access_token=...`` query values and the given secrets replaced by ***."""
    text = _ACCESS_TOKEN_IN_TEXT.sub(r"\1***", text)
    for secret in secrets:
        if len(secret) >= REDACT_MIN_CHARS:
            text = text.replace(secret, "***")
    return text
