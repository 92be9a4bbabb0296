"""Kite's text frames (order / error / message) and the control messages we send."""

from __future__ import annotations

import json

import orjson
import pytest

from streaming.kite.codec import (
    ErrorMessage,
    InfoMessage,
    KiteMessageError,
    OrderMessage,
    mode_message,
    parse_text_message,
    subscribe_message,
    unsubscribe_message,
)
from tests.fixtures import KITE_MOCKS


def test_order_update_from_kites_postback_mock():
    postback = json.loads((KITE_MOCKS / "postback.json").read_text())
    message = parse_text_message(orjson.dumps({"type": "order", "data": postback}))
    assert isinstance(message, OrderMessage)
    assert message.data.order_id == "220303000308932"
    assert message.data.status == "COMPLETE"
    assert message.data.instrument_token == 779521
    assert message.data.average_price == 470
    # Fields we do not model are kept, not dropped.
    assert message.data.model_extra["checksum"] == postback["checksum"]


def test_error_and_info_messages():
    error = parse_text_message('{"type": "error", "data": "Invalid access token"}')
    assert isinstance(error, ErrorMessage)
    assert error.data == "Invalid access token"
    info = parse_text_message(b'{"type": "message", "data": "Market closes early today"}')
    assert isinstance(info, InfoMessage)
    assert info.data == "Market closes early today"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("not json", "Invalid JSON"),
        ('{"type": "quote", "data": 1}', "does not match any of the expected tags"),
        ('{"data": "x"}', "Unable to extract tag"),
        ('{"type": "order", "data": {"status": "OPEN"}}', "order.data.order_id: Field required"),
        ('{"type": "error"}', "error.data: Field required"),
        ("[1, 2]", "<root>: Input should be an object"),
    ],
)
def test_bad_text_messages_raise_with_context(text, reason):
    with pytest.raises(KiteMessageError) as caught:
        parse_text_message(text)
    assert reason in caught.value.reason
    assert caught.value.excerpt == text[:200]
    assert isinstance(caught.value, ValueError)


def test_control_messages_are_what_kiteconnect_sends():
    # kiteconnect: json.dumps({"a": "subscribe", "v": tokens}) and {"a": "mode", "v": [mode, tokens]}
    assert json.loads(subscribe_message([408065, 256265])) == {
        "a": "subscribe",
        "v": [408065, 256265],
    }
    assert json.loads(unsubscribe_message(t for t in [1, 2])) == {"a": "unsubscribe", "v": [1, 2]}
    assert json.loads(mode_message("full", [408065])) == {"a": "mode", "v": ["full", [408065]]}
    assert subscribe_message([5]) == '{"a":"subscribe","v":[5]}'


def test_control_messages_refuse_bad_input():
    with pytest.raises(ValueError, match="unknown Kite mode 'fast'"):
        mode_message("fast", [1])
    with pytest.raises(ValueError, match="at least one"):
        subscribe_message([])
