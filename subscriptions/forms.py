"""Admin forms of the subscriptions app."""

from __future__ import annotations

from django import forms

from subscriptions.models import Subscription


class SubscribeChainForm(forms.Form):
    """The "Subscribe chain..." action: which expiries and how many strikes around the money."""

    underlying = forms.CharField(widget=forms.HiddenInput)
    expiries = forms.TypedMultipleChoiceField(
        coerce=str, widget=forms.CheckboxSelectMultiple, help_text="Upcoming expiries."
    )
    strikes_each_side = forms.IntegerField(min_value=0, max_value=50, initial=10)
    around_price = forms.FloatField(
        required=False,
        min_value=0.01,
        help_text="Centre of the strikes. Blank: the nearest future's last price in the registry.",
    )
    mode = forms.ChoiceField(choices=Subscription.Mode.choices, initial=Subscription.Mode.FULL)

    def __init__(self, *args, expiries: list, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["expiries"].choices = [(d.isoformat(), f"{d:%d %b %Y}") for d in expiries]
