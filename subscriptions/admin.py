"""Admin for ops: a read-only instrument registry fast at 100k rows, and subscriptions."""

from django.contrib import admin, messages
from django.contrib.admin.models import CHANGE, LogEntry
from django.contrib.contenttypes.models import ContentType
from django.core.paginator import Paginator
from django.db import connection
from django.utils.functional import cached_property

from streaming.control import notify_engines_on_commit
from subscriptions import services
from subscriptions.models import HistoryRange, Instrument, RebalanceRule, Subscription


class EstimatedCountPaginator(Paginator):
    """Uses PostgreSQL's planner estimate for an unfiltered table instead of a full COUNT.

    A filtered changelist still counts exactly: its filters run on indexed columns.
    """

    @cached_property
    def count(self) -> int:
        query = self.object_list.query
        if connection.vendor == "postgresql" and not query.where:
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass",
                    [self.object_list.model._meta.db_table],
                )
                row = cursor.fetchone()
            if row and row[0] > 0:
                return int(row[0])
        return super().count


@admin.register(Instrument)
class InstrumentAdmin(admin.ModelAdmin):
    list_display = [
        "tradingsymbol", "exchange", "segment", "instrument_type", "name", "expiry", "strike",
        "lot_size", "tick_size", "instrument_token",
    ]
    list_filter = ["exchange", "segment", "instrument_type", "expiry"]
    search_fields = ["tradingsymbol", "name", "=instrument_token"]
    ordering = ["exchange", "tradingsymbol"]
    paginator = EstimatedCountPaginator
    show_full_result_count = False
    list_per_page = 100

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


def _log_bulk_change(request, queryset, message: str) -> None:
    """Record one admin log entry per changed subscription, in one INSERT."""
    content_type = ContentType.objects.get_for_model(Subscription)
    LogEntry.objects.bulk_create(
        [
            LogEntry(
                user_id=request.user.pk,
                content_type=content_type,
                object_id=str(pk),
                object_repr=repr_[:200],
                action_flag=CHANGE,
                change_message=message,
            )
            for pk, repr_ in queryset
        ]
    )


@admin.register(Subscription)
class SubscriptionAdmin(admin.ModelAdmin):
    list_display = [
        "instrument", "mode", "status", "source", "pinned_account", "assigned_account",
        "streamed_mode", "unassigned_reason", "status_reason", "updated_at",
    ]
    list_filter = [
        "status", "mode", "source", "pinned_account", "assigned_account", "instrument__segment",
    ]
    search_fields = ["instrument__tradingsymbol", "instrument__name", "=instrument__instrument_token"]
    autocomplete_fields = ["instrument"]
    list_select_related = ["instrument", "pinned_account", "assigned_account"]
    readonly_fields = ["assigned_account", "streamed_mode", "unassigned_reason", "created_at", "updated_at"]
    actions = ["activate", "deactivate"]
    paginator = EstimatedCountPaginator
    show_full_result_count = False
    list_per_page = 100

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        notify_engines_on_commit()

    def delete_model(self, request, obj):
        super().delete_model(request, obj)
        notify_engines_on_commit()

    def delete_queryset(self, request, queryset):
        super().delete_queryset(request, queryset)
        notify_engines_on_commit()

    def _set_status(self, request, queryset, status: str, verb: str) -> None:
        rows = list(queryset.exclude(status=status).values_list("pk", "instrument__tradingsymbol"))
        changed = services.subscriptions_set_status(
            subscription_ids=[pk for pk, _ in rows], status=status, reason=f"{verb} by {request.user}"
        )
        _log_bulk_change(request, rows, f"{verb} (bulk action)")
        messages.success(request, f"{verb} {changed} subscription(s).")

    @admin.action(description="Activate selected subscriptions", permissions=["change"])
    def activate(self, request, queryset):
        self._set_status(request, queryset, Subscription.Status.ACTIVE, "Activated")

    @admin.action(description="Deactivate selected subscriptions", permissions=["change"])
    def deactivate(self, request, queryset):
        self._set_status(request, queryset, Subscription.Status.INACTIVE, "Deactivated")


@admin.register(RebalanceRule)
class RebalanceRuleAdmin(admin.ModelAdmin):
    list_display = [
        "name", "underlying", "expiries_next_n", "strikes_each_side", "mode", "pinned_account",
        "hysteresis_steps", "cooldown_s", "enabled", "center_strike", "last_rebalanced_at",
    ]
    list_filter = ["enabled", "underlying"]
    readonly_fields = ["center_strike", "last_rebalanced_at", "last_result", "created_at", "updated_at"]


@admin.register(HistoryRange)
class HistoryRangeAdmin(admin.ModelAdmin):
    list_display = ["instrument", "interval", "days_back", "enabled", "last_run_at"]
    list_filter = ["enabled", "interval"]
    autocomplete_fields = ["instrument"]
    readonly_fields = ["last_run_at", "last_result"]
