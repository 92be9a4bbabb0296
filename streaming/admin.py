"""Admin for ops: the engines (from their heartbeats) and the account leases, read-only.

Both tables are the engines' own bookkeeping: editing a row by hand would fight the engine
that renews it, so the admin only shows them.
"""

from __future__ import annotations

from django.contrib import admin
from django.utils import timezone

from streaming.models import AccountLease, EngineHeartbeat


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(EngineHeartbeat)
class EngineHeartbeatAdmin(ReadOnlyAdmin):
    list_display = ["engine_id", "mode", "heartbeat_age", "accounts", "streamed", "hostname", "pid", "started_at"]
    search_fields = ["engine_id", "hostname"]
    ordering = ["-updated_at"]

    @admin.display(description="mode")
    def mode(self, obj: EngineHeartbeat) -> str:
        return str(obj.state.get("mode", "")) if isinstance(obj.state, dict) else ""

    @admin.display(description="heartbeat age", ordering="-updated_at")
    def heartbeat_age(self, obj: EngineHeartbeat) -> str:
        return f"{(timezone.now() - obj.updated_at).total_seconds():.0f} s"

    @admin.display(description="accounts")
    def accounts(self, obj: EngineHeartbeat) -> str:
        accounts = obj.state.get("accounts") if isinstance(obj.state, dict) else None
        return ", ".join(sorted(accounts)) if isinstance(accounts, dict) and accounts else "-"

    @admin.display(description="instruments streamed")
    def streamed(self, obj: EngineHeartbeat):
        return obj.state.get("streamed_count") if isinstance(obj.state, dict) else None


@admin.register(AccountLease)
class AccountLeaseAdmin(ReadOnlyAdmin):
    list_display = ["account", "owner", "held", "acquired_at", "renewed_at", "expires_at"]
    list_select_related = ["account"]
    search_fields = ["account__label", "owner"]
    ordering = ["account__label"]

    @admin.display(description="held", boolean=True)
    def held(self, obj: AccountLease) -> bool:
        return obj.expires_at > timezone.now()
