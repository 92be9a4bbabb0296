"""Kite's order postbacks (webhooks): the body's shape and the checksum that proves its origin.

Kite POSTs the same order document it pushes on the ticker socket to the app's registered
postback URL, with ``checksum`` = SHA-256 hex of ``order_id + order_timestamp + api_secret``
(https://kite.trade/docs/connect/v3/postbacks). On the ticker socket the checksum is blank:
those updates are trusted by their channel, a postback only by its checksum.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

from pydantic import ConfigDict, Field

from streaming.kite.codec import OrderUpdate

__all__ = ["MAX_POSTBACK_BYTES", "Postback", "postback_checksum", "postback_checksum_valid"]

MAX_POSTBACK_BYTES: Final = 64 * 1024
"""A postback is one order (~1 KB); anything far larger is refused unread."""


class Postback(OrderUpdate):
    """One postback body: an order update with the fields a checksum needs made mandatory."""

    model_config = ConfigDict(extra="allow", frozen=True)

    order_timestamp: str = Field(min_length=1, max_length=32)
    checksum: str = Field(min_length=64, max_length=64, repr=False)
    user_id: str | None = None


def postback_checksum(*, order_id: str, order_timestamp: str, api_secret: str) -> str:
    """The checksum Kite sends with a postback of this order."""
    return hashlib.sha256(f"{order_id}{order_timestamp}{api_secret}".encode()).hexdigest()


def postback_checksum_valid(*, postback: Postback, api_secret: str) -> bool:
    """Whether the postback's checksum is the one ``api_secret`` gives (constant time)."""
    expected = postback_checksum(
        order_id=postback.order_id,
        order_timestamp=postback.order_timestamp,
        api_secret=api_secret,
    )
    return hmac.compare_digest(expected, postback.checksum.lower())
