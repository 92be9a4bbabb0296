"""Admin for ops: Kite accounts with write-only secrets and trading settings, API tokens
shown once; the orders' pages are in accounts/order_admin.py."""

from django import forms
from django.contrib import admin, messages
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html

from accounts import (
    order_admin,  # noqa: F401  (registers the orders' admin pages)
    selectors,
    services,
)
from accounts.models import MARKET_PROTECTION_AUTO, ApiToken, KiteAccount
from accounts.order_actions import (
    OrderActor,
    account_cancel_all,
    account_square_off,
    trading_switch_set,
)
from accounts.order_checks import OrderRefused
from accounts.order_desk import order_desk_from_settings
from accounts.order_selectors import accounts_tradable_by

EXCHANGE_CHOICES = [(e, e) for e in ("NSE", "BSE", "NFO", "BFO", "CDS", "BCD", "MCX")]
PRODUCT_CHOICES = [(p, p) for p in ("CNC", "NRML", "MIS", "MTF")]


class KiteAccountForm(forms.ModelForm):
    """Secrets are write-only: never rendered back; a blank field keeps the stored value."""

    api_secret = forms.CharField(
        required=False,
        strip=True,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="Write-only. Leave blank to keep the stored secret.",
    )
    access_token = forms.CharField(
        required=False,
        strip=True,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="Write-only. Leave blank to keep the stored token. Usually set by the Kite login.",
    )

    allowed_exchanges = forms.MultipleChoiceField(
        choices=EXCHANGE_CHOICES, required=False, widget=forms.CheckboxSelectMultiple,
        help_text="Exchanges orders may go to (none ticked: no orders).",
    )
    allowed_products = forms.MultipleChoiceField(
        choices=PRODUCT_CHOICES, required=False, widget=forms.CheckboxSelectMultiple,
        help_text="Products orders may use (none ticked: no orders).",
    )

    market_protection = forms.IntegerField(
        required=False, min_value=MARKET_PROTECTION_AUTO, max_value=100,
        help_text=KiteAccount._meta.get_field("market_protection").help_text + " Blank: -1.",
    )

    class Meta:
        model = KiteAccount
        fields = [
            "label", "api_key", "api_secret", "access_token", "kite_user_id", "status",
            "is_paper", "traders", "market_protection", "allowed_exchanges", "allowed_products",
            "max_lots_per_order", "max_notional_per_order", "daily_loss_cap",
        ]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Never put the stored secrets into the form's initial data.
        self.initial.pop("api_secret", None)
        self.initial.pop("access_token", None)

    def clean_market_protection(self) -> int:
        value = self.cleaned_data.get("market_protection")
        return MARKET_PROTECTION_AUTO if value is None else value

    def _post_clean(self):
        stored = {}
        for name in ("api_secret", "access_token"):
            if not self.cleaned_data.get(name) and self.instance.pk:
                stored[name] = self.instance.__dict__.get(name)
        super()._post_clean()
        for name, value in stored.items():
            self.instance.__dict__[name] = value


@admin.register(KiteAccount)
class KiteAccountAdmin(admin.ModelAdmin):
    form = KiteAccountForm
    list_display = [
        "label", "api_key", "kite_user_id", "status", "needs_login_display", "token_expires_at",
        "engine_display", "last_tick_display", "capacity_display",
        "secrets_display", "kite_login_link", "updated_at",
    ]
    list_filter = ["status"]
    search_fields = ["label", "api_key", "kite_user_id"]
    readonly_fields = [
        "kite_login_link", "token_issued_at", "token_expires_at", "last_error", "kill_switch",
        "kill_switch_reason", "created_at", "updated_at",
    ]
    filter_horizontal = ["traders"]
    actions = [
        "disable_accounts", "enable_accounts", "kill_switch_on", "kill_switch_off", "cancel_all_orders",
        "square_off_positions",
    ]

    def get_queryset(self, request):
        return selectors.account_list_with_engine(super().get_queryset(request), now=timezone.now())

    @admin.display(description="streamed by")
    def engine_display(self, obj: KiteAccount) -> str:
        return getattr(obj, "lease_owner", None) or "-"

    @admin.display(description="last tick")
    def last_tick_display(self, obj: KiteAccount) -> str:
        age_s = selectors.account_streaming(obj, now=timezone.now()).last_tick_age_s
        return "-" if age_s is None else f"{age_s:.0f} s ago"

    @admin.display(description="instruments / capacity")
    def capacity_display(self, obj: KiteAccount) -> str:
        streaming = selectors.account_streaming(obj, now=timezone.now())
        return f"{streaming.instruments} / {streaming.capacity}"

    @admin.display(description="needs login", boolean=True)
    def needs_login_display(self, obj: KiteAccount) -> bool:
        return obj.needs_login

    @admin.display(description="Kite login")
    def kite_login_link(self, obj: KiteAccount) -> str:
        if obj.pk is None:
            return "save the account first"
        return format_html('<a href="{}">Log in to Kite</a>', reverse("accounts:kite_login", args=[obj.pk]))

    @admin.display(description="secrets")
    def secrets_display(self, obj: KiteAccount) -> str:
        parts = [
            "api secret set" if obj.api_secret_is_set else "no api secret",
            "token set" if obj.access_token_is_set else "no token",
        ]
        return ", ".join(parts)

    def save_model(self, request, obj, form, change):
        if form.cleaned_data.get("access_token"):
            obj.token_issued_at = timezone.now()
            services.account_set_session(account=obj, access_token=form.cleaned_data["access_token"])
        else:
            # The service tells the running engines: a new status or key is picked up within
            # seconds, not at their next periodic reload.
            services.account_save(account=obj)

    @admin.action(description="Disable selected accounts", permissions=["change"])
    def disable_accounts(self, request, queryset):
        services.accounts_set_status(account_ids=[a.pk for a in queryset],
                                     status=KiteAccount.Status.DISABLED)
        for account in queryset:
            self.log_change(request, account, "Disabled from the admin action")
        messages.success(request, f"Disabled {queryset.count()} account(s).")

    @admin.action(description="Enable selected accounts", permissions=["change"])
    def enable_accounts(self, request, queryset):
        services.accounts_set_status(account_ids=[a.pk for a in queryset],
                                     status=KiteAccount.Status.ACTIVE)
        for account in queryset:
            self.log_change(request, account, "Enabled from the admin action")
        messages.success(request, f"Enabled {queryset.count()} account(s).")

    # --- trading: kill switch and the emergency actions, audited by the order services ---

    def has_trade_permission(self, request) -> bool:
        return request.user.has_perm("accounts.trade")

    @staticmethod
    def _actor(request) -> OrderActor:
        return OrderActor(user=request.user, origin="admin", remote_addr=request.META.get("REMOTE_ADDR"))

    @admin.action(description="Kill switch ON: refuse new orders", permissions=["trade"])
    def kill_switch_on(self, request, queryset):
        for account in queryset:
            trading_switch_set(actor=self._actor(request), halted=True, account=account,
                               reason=f"halted from the admin by {request.user.get_username()}")
        messages.warning(request, f"Kill switch on for {queryset.count()} account(s).")

    @admin.action(description="Kill switch OFF: take new orders again", permissions=["trade"])
    def kill_switch_off(self, request, queryset):
        for account in queryset:
            trading_switch_set(actor=self._actor(request), halted=False, reason="", account=account)
        messages.success(request, f"Kill switch off for {queryset.count()} account(s).")

    def _granted(self, request, queryset):
        granted = set(accounts_tradable_by(user=request.user).values_list("pk", flat=True))
        refused = [a.label for a in queryset if a.pk not in granted]
        if refused:
            messages.error(request, f"Not granted to you for trading: {', '.join(refused)}.")
        return [a for a in queryset if a.pk in granted]

    @admin.action(description="Cancel all open orders", permissions=["trade"])
    def cancel_all_orders(self, request, queryset):
        desk = order_desk_from_settings()
        for account in self._granted(request, queryset):
            result = account_cancel_all(actor=self._actor(request), account=account, desk=desk)
            messages.info(request, f"{account.label}: {len(result.body['orders'])} open order(s) cancelled or asked to.")

    @admin.action(description="Square off all positions", permissions=["trade"])
    def square_off_positions(self, request, queryset):
        desk = order_desk_from_settings()
        for account in self._granted(request, queryset):
            try:
                result = account_square_off(actor=self._actor(request), account=account, desk=desk)
            except OrderRefused as refused:
                messages.error(request, f"{account.label}: {refused.message}")
                continue
            messages.info(request, f"{account.label}: {len(result.body['positions'])} position(s) squared off.")


class ApiTokenScopesField(forms.MultipleChoiceField):
    def __init__(self, **kwargs) -> None:
        super().__init__(
            choices=ApiToken.Scope.choices, widget=forms.CheckboxSelectMultiple,
            help_text="What programs holding this token may do.", **kwargs,
        )  # fmt: skip


class ApiTokenForm(forms.ModelForm):
    scopes = ApiTokenScopesField(required=False)

    class Meta:
        model = ApiToken
        fields = ["name", "scopes"]


class ApiTokenAddForm(forms.ModelForm):
    scopes = ApiTokenScopesField(initial=[ApiToken.Scope.READ])

    class Meta:
        model = ApiToken
        fields = ["user", "name", "scopes"]


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ["name", "user", "prefix", "scopes_display", "created_at", "last_used_at", "revoked_at"]
    list_filter = ["revoked_at"]
    search_fields = ["name", "prefix", "user__username"]
    readonly_fields = ["prefix", "created_at", "last_used_at", "revoked_at"]
    actions = ["revoke_tokens"]

    @admin.display(description="scopes")
    def scopes_display(self, obj: ApiToken) -> str:
        return ", ".join(obj.scopes) or "none"

    def get_form(self, request, obj=None, **kwargs):
        kwargs["form"] = ApiTokenAddForm if obj is None else ApiTokenForm
        return super().get_form(request, obj, **kwargs)

    def get_readonly_fields(self, request, obj=None):
        return [*self.readonly_fields, "user"] if obj else self.readonly_fields

    def save_model(self, request, obj, form, change):
        if change:
            super().save_model(request, obj, form, change)
            return
        token, key = services.apitoken_create(
            user=obj.user, name=obj.name, scopes=form.cleaned_data["scopes"]
        )
        obj.pk = token.pk
        # Shown once by response_add, in that response only: a message would travel in the
        # messages cookie (signed, not encrypted) or sit in the session.
        request.api_key_created = key

    def response_add(self, request, obj, post_url_continue=None):
        key = getattr(request, "api_key_created", None)
        if key is None:
            return super().response_add(request, obj, post_url_continue)
        response = TemplateResponse(
            request,
            "admin/accounts/apitoken/created.html",
            {**self.admin_site.each_context(request), "title": "API token created", "token": obj,
             "key": key, "opts": self.opts},
        )
        response["Cache-Control"] = "no-store"
        return response

    @admin.action(description="Revoke selected tokens", permissions=["change"])
    def revoke_tokens(self, request, queryset):
        for token in queryset.filter(revoked_at__isnull=True):
            services.apitoken_revoke(token=token)
            self.log_change(request, token, "Revoked")
        messages.success(request, "Revoked.")

