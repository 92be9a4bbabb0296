"""Admin for ops: Kite accounts with write-only secrets, API tokens shown once."""

from django import forms
from django.contrib import admin, messages
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html

from accounts import selectors, services
from accounts.models import ApiToken, KiteAccount, OrderSyncRun


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

    class Meta:
        model = KiteAccount
        fields = ["label", "api_key", "api_secret", "access_token", "kite_user_id", "status"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Never put the stored secrets into the form's initial data.
        self.initial.pop("api_secret", None)
        self.initial.pop("access_token", None)

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
        "kite_login_link", "token_issued_at", "token_expires_at", "last_error", "created_at", "updated_at",
    ]
    actions = ["disable_accounts", "enable_accounts"]

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


@admin.register(OrderSyncRun)
class OrderSyncRunAdmin(admin.ModelAdmin):
    """Each order sync and what it had to correct: read-only, written by accounts/sync.py."""

    list_display = [
        "account", "trigger", "status", "started_at", "finished_at", "orders_seen",
        "trades_seen", "correction_count", "error",
    ]  # fmt: skip
    list_filter = ["status", "trigger", "account"]
    date_hierarchy = "started_at"
    readonly_fields = [f.name for f in OrderSyncRun._meta.fields]

    @admin.display(description="corrections")
    def correction_count(self, obj: OrderSyncRun) -> int:
        return len(obj.corrections)

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False
