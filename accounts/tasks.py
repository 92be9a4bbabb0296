"""Celery tasks for broker accounts."""

from __future__ import annotations

from typing import Any, Final

from celery import Task, shared_task

from accounts.models import KiteAccount, OrderSyncRun
from accounts.services import accounts_expire_sessions
from accounts.sync import order_sync_accounts, order_sync_run
from streaming.locks import run_locked
from subscriptions.tasks import DATABASE_BLIPS, RETRY_BACKOFF

EXPIRE_SESSIONS_TIME_LIMIT_S: Final = 60
ORDER_SYNC_TIME_LIMIT_S: Final = 120


@shared_task(
    name="accounts.expire_sessions",
    bind=True,
    soft_time_limit=EXPIRE_SESSIONS_TIME_LIMIT_S - 10,
    time_limit=EXPIRE_SESSIONS_TIME_LIMIT_S,
    # A daily job: a database blip at 06:00 must not leave expired sessions unmarked all day.
    autoretry_for=DATABASE_BLIPS,
    **RETRY_BACKOFF,
)
def expire_sessions(self: Task) -> dict[str, Any]:
    """At 06:00 IST: mark accounts whose access token has expired; the admin shows who must log in."""

    def run() -> dict[str, Any]:
        return {"expired": accounts_expire_sessions()}

    return run_locked(
        name="expire_sessions", time_limit_s=EXPIRE_SESSIONS_TIME_LIMIT_S,
        task_id=self.request.id or "", fn=run,
    )


@shared_task(
    name="accounts.sync_orders",
    bind=True,
    soft_time_limit=ORDER_SYNC_TIME_LIMIT_S - 10,
    time_limit=ORDER_SYNC_TIME_LIMIT_S,
    autoretry_for=DATABASE_BLIPS,
    **RETRY_BACKOFF,
)
def sync_orders(
    self: Task, account_id: int | None = None, trigger: str = OrderSyncRun.Trigger.SCHEDULE
) -> dict[str, Any]:
    """Reconcile orders, trades and positions with Kite: one account (runticker's reconnect),
    or every live account with a session (the schedule). One run per account at a time."""
    if account_id is None:
        accounts = order_sync_accounts()
    else:
        accounts = list(KiteAccount.objects.filter(pk=account_id))
        if not accounts:
            return {"skipped": f"no account {account_id}"}
    results: dict[str, Any] = {}
    for account in accounts:

        def run(account: KiteAccount = account) -> dict[str, Any]:
            done = order_sync_run(account=account, trigger=trigger)
            return {"run": done.pk, "status": done.status, "corrections": len(done.corrections)}

        results[account.label] = run_locked(
            name=f"order_sync:{account.pk}", time_limit_s=ORDER_SYNC_TIME_LIMIT_S,
            task_id=self.request.id or "", fn=run,
        )  # fmt: skip
    return results
