"""Admin for orders: read-only orders, trades, positions and audits; the global kill switch.

Loaded by accounts/admin.py. Order state is written only by the order services, so these
pages show it and never edit it; the kill switch is changed through ``trading_switch_set``,
which audits it.
"""

from django.contrib import admin

from accounts.models import Order, OrderAudit, PositionSnapshot, Trade, TradingSwitch
from accounts.order_actions import OrderActor, trading_switch_set


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(Order)
class OrderAdmin(ReadOnlyAdmin):
    list_display = ["pk", "account", "kite_order_id", "tag", "tradingsymbol", "transaction_type", "order_type",
                    "quantity", "filled_quantity", "status", "updated_at"]
    list_filter = ["status", "account", "exchange"]
    search_fields = ["kite_order_id", "tag", "tradingsymbol", "placement__idempotency_key"]
    list_select_related = ["account"]


@admin.register(Trade)
class TradeAdmin(ReadOnlyAdmin):
    list_display = ["trade_id", "account", "kite_order_id", "tradingsymbol", "transaction_type", "quantity",
                    "average_price", "fill_timestamp", "source"]
    list_filter = ["account", "source"]
    search_fields = ["trade_id", "kite_order_id", "tradingsymbol"]


@admin.register(PositionSnapshot)
class PositionSnapshotAdmin(ReadOnlyAdmin):
    list_display = ["account", "taken_at", "source"]
    list_filter = ["account", "source"]


@admin.register(OrderAudit)
class OrderAuditAdmin(ReadOnlyAdmin):
    list_display = ["created_at", "action", "outcome", "error_code", "account", "order", "user", "token_prefix",
                    "origin", "remote_addr"]
    list_filter = ["action", "outcome", "origin", "account"]
    search_fields = ["error_code", "token_prefix", "user__username", "order__kite_order_id", "order__tag"]
    list_select_related = ["account", "order", "user"]


@admin.register(TradingSwitch)
class TradingSwitchAdmin(admin.ModelAdmin):
    """The global kill switch: halts new orders on every account while on."""

    fields = ["halted", "reason", "changed_by", "changed_at"]
    readonly_fields = ["changed_by", "changed_at"]
    list_display = ["__str__", "reason", "changed_by", "changed_at"]

    def has_add_permission(self, request):
        return request.user.has_perm("accounts.trade") and not TradingSwitch.objects.exists()

    def has_change_permission(self, request, obj=None):
        return request.user.has_perm("accounts.trade")

    def has_delete_permission(self, request, obj=None):
        return False

    def save_model(self, request, obj, form, change):
        trading_switch_set(
            actor=OrderActor(user=request.user, origin="admin", remote_addr=request.META.get("REMOTE_ADDR")),
            halted=obj.halted, reason=obj.reason,
        )  # fmt: skip
        obj.pk = TradingSwitch.SINGLETON_PK
