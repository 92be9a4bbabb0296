"""The CSV format of the admin's subscription import (django-import-export).

One row per instrument: ``exchange``, ``tradingsymbol``, ``mode`` (ltp, quote or full; blank
means full) and ``pinned_account`` (an account label, or blank). Each row subscribes its
instrument through :func:`subscriptions.services.subscription_activate`, the one writer of
subscriptions. The admin shows a dry-run preview first; a file with any bad row imports
nothing and lists every bad row with its reason.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from import_export import fields, resources
from import_export.widgets import ForeignKeyWidget

from accounts.models import KiteAccount
from subscriptions import services
from subscriptions.models import Instrument, Subscription
from subscriptions.selectors import instrument_get_by_symbol

IMPORT_COLUMNS = ("exchange", "tradingsymbol", "mode", "pinned_account")


class SubscriptionResource(resources.ModelResource):
    exchange = fields.Field(column_name="exchange", attribute="instrument__exchange", readonly=True)
    tradingsymbol = fields.Field(
        column_name="tradingsymbol", attribute="instrument__tradingsymbol", readonly=True
    )
    mode = fields.Field(column_name="mode", attribute="mode")
    pinned_account = fields.Field(
        column_name="pinned_account",
        attribute="pinned_account",
        widget=ForeignKeyWidget(KiteAccount, field="label"),
    )

    class Meta:
        model = Subscription
        fields = IMPORT_COLUMNS
        import_id_fields = ()
        clean_model_instances = True
        use_transactions = True
        skip_unchanged = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._instrument: Instrument | None = None

    def before_import(self, dataset, **kwargs: Any) -> None:
        missing = [c for c in ("exchange", "tradingsymbol") if c not in (dataset.headers or [])]
        if missing:
            raise ValidationError(
                f"missing column(s) {', '.join(missing)}; expected: {', '.join(IMPORT_COLUMNS)}"
            )

    def before_import_row(self, row: dict[str, Any], **kwargs: Any) -> None:
        """Resolve the row's instrument and check its values, each error naming its column."""
        exchange = str(row.get("exchange") or "").strip().upper()
        symbol = str(row.get("tradingsymbol") or "").strip().upper()
        row["mode"] = str(row.get("mode") or Subscription.Mode.FULL).strip().lower()
        label = str(row.get("pinned_account") or "").strip()
        row["pinned_account"] = label
        errors: dict[str, str] = {}
        self._instrument = None
        if not exchange or not symbol:
            errors["tradingsymbol"] = "exchange and tradingsymbol are both required"
        else:
            self._instrument = instrument_get_by_symbol(exchange=exchange, tradingsymbol=symbol)
            if self._instrument is None:
                errors["tradingsymbol"] = (
                    f"no instrument {exchange}:{symbol} in the registry (refresh instruments?)"
                )
        if row["mode"] not in Subscription.Mode.values:
            errors["mode"] = f"{row['mode']!r} is not one of {', '.join(Subscription.Mode.values)}"
        if label and not KiteAccount.objects.filter(label=label).exists():
            errors["pinned_account"] = f"no account labelled {label!r}"
        if errors:
            raise ValidationError(errors)

    def get_instance(self, instance_loader, row):
        return Subscription.objects.filter(instrument=self._instrument).first()

    def init_instance(self, row=None):
        return Subscription(instrument=self._instrument)

    def save_instance(self, instance: Subscription, is_create: bool, row, **kwargs: Any) -> None:
        services.subscription_activate(
            instrument=instance.instrument,
            mode=instance.mode,
            source=Subscription.Source.MANUAL,
            pinned_account=instance.pinned_account,
        )
