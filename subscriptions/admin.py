"""Admin for ops: a read-only instrument registry fast at 100k rows, and subscriptions."""

import datetime as dt

from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.models import CHANGE, LogEntry
from django.contrib.contenttypes.models import ContentType
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db import connection
from django.http import HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.functional import cached_property
from django_celery_beat import admin as beat_admin
from django_celery_beat.models import PeriodicTask
from import_export.admin import ImportMixin
from import_export.formats.base_formats import CSV

from subscriptions import selectors, services, tasks
from subscriptions.forms import SubscribeChainForm
from subscriptions.imports import SubscriptionResource
from subscriptions.jobs import drift_report_latest
from subscriptions.models import (
    DriftReport,
    HistoryRange,
    Instrument,
    JobRun,
    RebalanceRule,
    Subscription,
)


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


class UpcomingExpiryFilter(admin.SimpleListFilter):
    """The next expiries (not every date since the registry began), plus "expired"."""

    title = "expiry"
    parameter_name = "expiry"
    upcoming_count = 12

    def lookups(self, request, model_admin):
        today = timezone.localdate()
        upcoming = selectors.instrument_list_upcoming_expiries(on_or_after=today, limit=self.upcoming_count)
        return [(d.isoformat(), f"{d:%d %b %Y}") for d in upcoming] + [("expired", "expired")]

    def queryset(self, request, queryset):
        value = self.value()
        if not value:
            return queryset
        if value == "expired":
            return queryset.filter(expiry__lt=timezone.localdate())
        try:
            return queryset.filter(expiry=dt.date.fromisoformat(value))
        except ValueError:
            return queryset.none()  # a hand-edited URL: show nothing rather than fail


REFRESH_PERMISSION = "subscriptions.change_instrument"


@admin.register(Instrument)
class InstrumentAdmin(admin.ModelAdmin):
    change_list_template = "admin/subscriptions/instrument/change_list.html"
    list_display = [
        "tradingsymbol", "exchange", "segment", "instrument_type", "name", "expiry", "strike",
        "lot_size", "tick_size", "instrument_token",
    ]
    list_filter = ["exchange", "segment", "instrument_type", UpcomingExpiryFilter]
    search_fields = ["tradingsymbol", "name", "=instrument_token"]
    ordering = ["exchange", "tradingsymbol"]
    paginator = EstimatedCountPaginator
    show_full_result_count = False
    list_per_page = 100

    actions = ["subscribe_chain"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def has_subscribe_permission(self, request) -> bool:
        """The registry is read-only; subscribing is adding subscriptions."""
        return request.user.has_perm("subscriptions.add_subscription")

    @admin.action(description="Subscribe chain...", permissions=["subscribe"])
    def subscribe_chain(self, request, queryset):
        """Subscribe the chain of the selected instruments' underlying around the money.

        The first POST (from the changelist) shows the form; its own POST ("apply") subscribes.
        """
        names = sorted(set(queryset.exclude(name="").values_list("name", flat=True)))
        if len(names) != 1:
            self.message_user(
                request, f"Select instruments of one underlying (got {', '.join(names) or 'none'}).",
                messages.ERROR,
            )
            return None
        underlying = names[0]
        today = timezone.localdate()
        expiries = selectors.instrument_list_expiries(underlying=underlying, on_or_after=today)
        form = SubscribeChainForm(
            request.POST if "apply" in request.POST else None,
            expiries=expiries,
            initial={"underlying": underlying, "expiries": [e.isoformat() for e in expiries[:1]]},
        )
        if form.is_valid():
            price = form.cleaned_data["around_price"] or selectors.instrument_nearest_future_price(
                underlying=underlying, on_or_after=today
            )
            if price is None:
                form.add_error("around_price", f"no price known for {underlying}: enter one")
            else:
                chosen = [dt.date.fromisoformat(v) for v in form.cleaned_data["expiries"]]
                activated = services.subscriptions_activate_chain(
                    underlying=underlying,
                    expiries=chosen,
                    around_price=price,
                    strikes_each_side=form.cleaned_data["strikes_each_side"],
                    mode=form.cleaned_data["mode"],
                )
                self.message_user(
                    request,
                    f"Subscribed {len(activated)} {underlying} option(s) around {price:g} "
                    f"for {', '.join(f'{d:%d %b}' for d in chosen)}.",
                    messages.SUCCESS,
                )
                return None
        context = {
            **self.admin_site.each_context(request),
            "title": f"Subscribe the {underlying} chain",
            "form": form,
            "opts": self.model._meta,
            "selected": request.POST.getlist(admin.helpers.ACTION_CHECKBOX_NAME),
            "action": "subscribe_chain",
        }
        return TemplateResponse(request, "admin/subscriptions/instrument/subscribe_chain.html", context)

    def changelist_view(self, request, extra_context=None):
        extra_context = {**(extra_context or {}), "can_refresh": request.user.has_perm(REFRESH_PERMISSION)}
        return super().changelist_view(request, extra_context)

    def get_urls(self):
        refresh = path(
            "refresh/",
            self.admin_site.admin_view(self.refresh_now_view),
            name="subscriptions_instrument_refresh",
        )
        return [refresh, *super().get_urls()]

    def refresh_now_view(self, request):
        """POST from the changelist's "Refresh instruments now" button: run the refresh job."""
        changelist = reverse("admin:subscriptions_instrument_changelist")
        # The refresh rewrites the registry: it needs the change permission (the admin's own
        # has_change_permission is False only to keep rows read-only in the forms).
        if not request.user.has_perm(REFRESH_PERMISSION):
            raise PermissionDenied(f"refreshing instruments needs {REFRESH_PERMISSION}")
        if request.method != "POST":
            return HttpResponseRedirect(changelist)
        outcome = tasks.job_dispatch(tasks.refresh_instruments, embedded=settings.EMBEDDED)
        messages.info(request, f"Instrument refresh {outcome}.")
        return HttpResponseRedirect(changelist)


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
class SubscriptionAdmin(ImportMixin, admin.ModelAdmin):
    # "Import" on the changelist: CSV (subscriptions/imports.py), a dry-run preview, then confirm.
    resource_classes = [SubscriptionResource]
    import_formats = [CSV]
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
        services.subscription_save(subscription=obj)

    def changelist_view(self, request, extra_context=None):
        report = drift_report_latest()
        if report is not None and not report.ok:
            messages.warning(
                request,
                f"Drift found at {report.checked_at:%H:%M:%S}: {report.summary} (see Drift reports).",
            )
        return super().changelist_view(request, extra_context)

    def delete_model(self, request, obj):
        services.subscriptions_delete(subscription_ids=[obj.pk])

    def delete_queryset(self, request, queryset):
        services.subscriptions_delete(subscription_ids=list(queryset.values_list("pk", flat=True)))

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
    readonly_fields = [
        "center_strike", "centers", "last_rebalanced_at", "last_result", "created_at", "updated_at",
    ]
    actions = ["rebalance_now"]

    @admin.action(description="Rebalance selected rules now", permissions=["change"])
    def rebalance_now(self, request, queryset):
        rule_ids = list(queryset.values_list("pk", flat=True))
        outcome = tasks.job_dispatch(
            tasks.rebalance_strikes, embedded=settings.EMBEDDED, rule_ids=rule_ids
        )
        messages.info(request, f"Rebalance of {len(rule_ids)} rule(s) {outcome}.")


@admin.register(HistoryRange)
class HistoryRangeAdmin(admin.ModelAdmin):
    list_display = ["instrument", "interval", "days_back", "enabled", "last_run_at"]
    list_filter = ["enabled", "interval"]
    autocomplete_fields = ["instrument"]
    readonly_fields = ["last_run_at", "last_result"]


@admin.register(DriftReport)
class DriftReportAdmin(admin.ModelAdmin):
    """What the reconciler found last: read-only, written every run."""

    list_display = [
        "name", "ok", "checked_at", "desired", "streamed", "heartbeat_streamed", "engines_alive",
        "missing", "extra", "mode_mismatch", "unassigned", "summary",
    ]
    readonly_fields = [f.name for f in DriftReport._meta.fields]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(JobRun)
class JobRunAdmin(admin.ModelAdmin):
    """The last run of each job: written by the worker (tickerproj/celery_observability.py)."""

    list_display = ["task_name", "outcome", "finished_at", "duration_s", "summary", "task_id"]
    list_filter = ["outcome"]
    ordering = ["task_name"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class PeriodicTaskAdmin(beat_admin.PeriodicTaskAdmin):
    """django-celery-beat's admin, whose actions (enable, disable, toggle, run now) ask for no
    permission: here each needs the change permission, as every action of ours does."""

    def get_actions(self, request):
        actions = super().get_actions(request)
        if self.has_change_permission(request):
            return actions
        return {name: a for name, a in actions.items() if name not in beat_admin.PeriodicTaskAdmin.actions}


admin.site.unregister(PeriodicTask)
admin.site.register(PeriodicTask, PeriodicTaskAdmin)
