"""A canary secret swept across everything the deployment writes or serves.

One account gets a unique Kite access token (the simulator is told, so the engines really
stream with it) and a unique API secret (daphne decrypts it to check a postback's checksum);
an API key is presented over HTTP and both WebSocket ways, and a made-up key is presented
too. Then every process log, the whole Redis dataset (every database, the channel layer's
messages included), a pg_dump of the database, /health, /metrics, the API's status and the
admin pages are searched for each of them (promise: found 0 times). The account's own
credentials are put back afterwards, so the scenarios that follow see the deployment as it was.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import orjson

from faults.registry import Outcome, Promise, scenario
from faults.scenarios.security_client import Http, ws_open, ws_recv
from faults.scenarios.security_identities import identities_create

CANARY_IP = "127.0.0.41"
STREAM_RESUME_TIMEOUT_S = 60.0
PG_DUMP_CANDIDATES = ("/usr/lib/postgresql/15/bin/pg_dump", "pg_dump")
PG_DUMP_TIMEOUT_S = 120


def _canary(kind: str) -> str:
    # Distinctive and URL-safe, so its URL-encoded form is itself.
    return f"canary{kind}{secrets.token_hex(16)}"


def _needles(values: dict[str, str]) -> dict[str, bytes]:
    """What is searched: each value's random part (a truncated leak is still a leak)."""
    return {name: value[-24:].encode() for name, value in values.items()}


def _count(data: bytes, needles: dict[str, bytes]) -> dict[str, int]:
    return {name: data.count(needle) for name, needle in needles.items() if needle in data}


FERNET_PREFIX = "gAAAA"
"""Every Fernet token starts so (version byte 0x80, then the timestamp)."""


def _stored_columns(account_id: int) -> tuple[str, str]:
    """The account's encrypted columns as stored: raw SQL, past the field's decryption."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT access_token, api_secret FROM accounts_kiteaccount WHERE id = %s", [account_id]
        )
        return cursor.fetchone()


def _log_files(dep) -> list[Path]:
    """Each process's log, and every other file in the folders those logs are in."""
    files: set[Path] = set()
    for proc in dep.procs.values():
        path = Path(proc.log_path)
        files.add(path)
        if path.parent.is_dir():
            files.update(p for p in path.parent.iterdir() if p.is_file())
    return sorted(files)


def _redis_dump(dep, folder: Path) -> bytes:
    """The private Redis's whole dataset as an uncompressed RDB file."""
    target = folder / "redis.rdb"
    dep.redis_cli("CONFIG", "SET", "rdbcompression", "no")
    dep.redis_cli("--rdb", str(target))
    return target.read_bytes()


def _pg_dump(dep, folder: Path) -> bytes:
    binary = next((b for b in PG_DUMP_CANDIDATES if shutil.which(b) or os.path.exists(b)), None)
    if binary is None:
        raise RuntimeError("pg_dump not found")
    target = folder / "db.sql"
    subprocess.run(
        [binary, "--no-owner", "--file", str(target), dep.direct_env["DATABASE_URL"]],
        check=True, capture_output=True, timeout=PG_DUMP_TIMEOUT_S,
    )  # fmt: skip
    return target.read_bytes()


async def _present_keys(dep, *, key: str, wrong_key: str, secret_user_id: str) -> None:
    """Use the API key over HTTP and both WebSocket ways; present a made-up key; make daphne
    decrypt the canary API secret (a postback whose checksum it must compare)."""
    async with Http(dep.http_url, local_ip=CANARY_IP) as http:
        for k in (key, wrong_key):
            await http.request("GET", "/api/v1/underlyings", headers={"Authorization": f"Token {k}"})
            await http.request("GET", "/api/v1/underlyings", headers={"Authorization": f"Bearer {k}"})
        postback = {"order_id": "canary-order", "status": "COMPLETE", "user_id": secret_user_id,
                    "order_timestamp": "2026-01-05 09:15:00", "checksum": "0" * 64}
        await http.request("POST", "/api/v1/kite/postback", json=postback)
    for k in (key, wrong_key):
        for headers, protocols in (
            ({"Authorization": f"Token {k}"}, ("tickerproj.v1",)),
            ({}, ("tickerproj.v1", f"tickerproj.token.{k}")),
        ):
            ws = await ws_open(dep.ws_url, local_ip=CANARY_IP, headers=headers, subprotocols=protocols)
            if hasattr(ws, "send"):
                await ws_recv(ws, timeout_s=10)
                await ws.close()


def _http_pages(dep, superuser, account_id: int, token_id: int) -> dict[str, bytes]:
    ops = dep.env.get("OPS_TOKEN", "")
    pages = {
        "/health": {}, "/metrics": {},
        "/api/v1/status": {},
        "/admin/accounts/kiteaccount/": {}, f"/admin/accounts/kiteaccount/{account_id}/change/": {},
        "/admin/accounts/apitoken/": {}, f"/admin/accounts/apitoken/{token_id}/change/": {},
        "/admin/accounts/orderaudit/": {}, "/admin/": {},
    }  # fmt: skip

    async def fetch() -> dict[str, bytes]:
        got = {}
        async with Http(dep.http_url, local_ip=CANARY_IP) as http:
            for path in pages:
                answer = await http.request("GET", path, headers=superuser.headers())
                got[f"{path} (superuser)"] = answer.body
                if ops and path in ("/health", "/metrics"):
                    answer = await http.request("GET", path, headers={"Authorization": f"Bearer {ops}"})
                    got[f"{path} (OPS_TOKEN)"] = answer.body
        return got

    return asyncio.run(fetch())


@scenario("security.canary_sweep", group="security", quick=True)
def canary_sweep(dep) -> Outcome:
    """A unique Kite access token, API secret and API keys, used for real, then searched for
    in every log, all of Redis, a pg_dump, /health, /metrics and the admin pages."""
    from django.contrib.auth import get_user_model

    from accounts.models import KiteAccount
    from accounts.services import account_save, account_set_session, apitoken_create

    canaries = {"access_token": _canary("TOKEN"), "api_secret": _canary("SECRET"),
                "api_key": "", "presented_key": _canary("KEY")}  # fmt: skip
    account = KiteAccount.objects.get(api_key=dep.api_keys[0])
    original_token, original_secret = account.access_token, account.api_secret
    started = time.monotonic()
    user = get_user_model().objects.create_user(username=f"sec-canary-{secrets.token_hex(3)}")
    token, canaries["api_key"] = apitoken_create(user=user, name="canary", scopes=["read"])
    needles = _needles(canaries)
    found: dict[str, dict[str, int]] = {}
    swept_bytes = 0
    try:
        dep.sim("set_access_token", account.api_key, canaries["access_token"])
        account.api_secret = canaries["api_secret"]
        account_save(account=account)
        account_set_session(account=account, access_token=canaries["access_token"],
                            user_id=account.kite_user_id)
        resumed_s = dep.wait_healthy(STREAM_RESUME_TIMEOUT_S)
        asyncio.run(_present_keys(dep, key=canaries["api_key"], wrong_key=canaries["presented_key"],
                                  secret_user_id=account.kite_user_id))
        superuser = next(i for i in identities_create(tag=secrets.token_hex(3)) if i.is_superuser)
        stored = _stored_columns(account.pk)
        encrypted = all(v.startswith(FERNET_PREFIX) and not _count(v.encode(), needles) for v in stored)
        time.sleep(2.0)  # lets the processes write what they were told
        with tempfile.TemporaryDirectory(prefix="faults-canary-") as tmp:
            folder = Path(tmp)
            sources: dict[str, bytes | Exception] = {}
            for path in _log_files(dep):
                sources[f"log {path.name}"] = path.read_bytes()
            for name, fn in (("redis", _redis_dump), ("pg_dump", _pg_dump)):
                try:
                    sources[name] = fn(dep, folder)
                except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                    sources[name] = exc
            for name, body in _http_pages(dep, superuser, account.pk, token.pk).items():
                sources[f"http {name}"] = body
        unswept = [name for name, data in sources.items() if isinstance(data, Exception)]
        for name, data in sources.items():
            if isinstance(data, bytes):
                swept_bytes += len(data)
                if hits := _count(data, needles):
                    found[name] = hits
    finally:
        account = KiteAccount.objects.get(pk=account.pk)
        account.api_secret = original_secret
        account_save(account=account)
        if original_token:
            dep.sim("set_access_token", account.api_key, original_token)
            account_set_session(account=account, access_token=original_token,
                                user_id=account.kite_user_id)
    total = sum(sum(h.values()) for h in found.values())
    where = "; ".join(f"{name}: {orjson.dumps(h).decode()}" for name, h in found.items())
    return Outcome(
        figures={"canaries": len(canaries), "sources": len(sources) - len(unswept),
                 "swept_mb": round(swept_bytes / 2**20, 1), "found": total,
                 "stream_resumed_s": resumed_s, "s": round(time.monotonic() - started, 1)},
        promises=[
            Promise("canary found 0 times", held=total == 0, detail=where or "0"),
            Promise("every source swept (logs, Redis, pg_dump, pages)", held=not unswept,
                    detail=", ".join(f"{n}: {sources[n]}"[:120] for n in unswept) or "all"),
            Promise("Kite secrets stored encrypted", held=encrypted, detail="Fernet" if encrypted else str(stored)[:40]),
        ],
    )  # fmt: skip
