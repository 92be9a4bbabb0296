"""The publisher's bulk sender (streaming/engine/publisher.py, _RedisBulkSender) runs a copy of
channels-redis's group_send Lua script: this fails when the installed channels-redis's script
changes, before the copy silently diverges from what group_send does."""

from __future__ import annotations

import hashlib
import inspect
import re

import channels_redis
from channels_redis.core import RedisChannelLayer

from streaming.engine import publisher

# sha256 of channels-redis 4.3.0's group_send script, whitespace collapsed.
GROUP_SEND_LUA_SHA256 = "8346c28a49fe60d5dfb9f85e371250b9585e4e8d926d6f6ec34d95a0f347d3e8"

RECHECK = (
    "channels-redis {version} changed RedisChannelLayer.group_send's Lua script. Re-check "
    "streaming/engine/publisher.py's _RedisBulkSender against the new group_send (its Lua "
    "script, the keys and arguments it passes, _map_channel_keys_to_connection, the expiry "
    "steps before it), copy the new script into _GROUP_SEND_LUA, run "
    "tests/streaming/engine/test_publisher.py, then store the new fingerprint here."
)


def normalised(script: str) -> str:
    return " ".join(script.split())


def installed_group_send_lua() -> str:
    source = inspect.getsource(RedisChannelLayer.group_send)
    found = re.findall(r'group_send_lua\s*=\s*"""(.*?)"""', source, flags=re.DOTALL)
    assert len(found) == 1, RECHECK.format(version=channels_redis.__version__) + (
        f" (group_send now has {len(found)} scripts named group_send_lua)"
    )
    return found[0]


def test_installed_group_send_script_is_the_one_the_bulk_sender_copied():
    digest = hashlib.sha256(normalised(installed_group_send_lua()).encode()).hexdigest()
    assert digest == GROUP_SEND_LUA_SHA256, RECHECK.format(version=channels_redis.__version__)


def test_the_bulk_senders_copy_is_that_script():
    assert normalised(publisher._GROUP_SEND_LUA) == normalised(installed_group_send_lua()), (
        "_GROUP_SEND_LUA in streaming/engine/publisher.py differs from the installed "
        "channels-redis's group_send script: " + RECHECK.format(version=channels_redis.__version__)
    )
