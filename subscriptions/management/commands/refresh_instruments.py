"""Download Kite's instrument dump and bring the Instrument registry in line with it."""

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from accounts.models import KiteAccount
from accounts.selectors import account_list_streamable
from streaming.kite.rest import KiteError, KiteRateLimiter, KiteRestClient
from subscriptions.services import InstrumentDumpSuspicious, instruments_refresh


class Command(BaseCommand):
    help = (
        "Refresh instruments from Kite's dump (all exchanges, or --exchange NFO ...): upsert, "
        "remove delisted ones nothing references, deactivate subscriptions of expired ones."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--exchange", action="append", dest="exchanges", metavar="EXCHANGE",
            help="Refresh only this exchange (repeatable). Default: Kite's full dump.",
        )
        parser.add_argument(
            "--account", metavar="LABEL",
            help="Kite account whose API key downloads the dump. Default: the first streamable one.",
        )
        parser.add_argument(
            "--force", action="store_true",
            help="Apply a dump even if it is under half the size of the registry held.",
        )

    def handle(self, *args, exchanges=None, account=None, force=False, **options):
        kite_account = self._account(account)
        client = KiteRestClient(
            api_key=kite_account.api_key,
            # The dump needs no session at Kite; a stored token is sent when there is one.
            access_token=kite_account.access_token if kite_account.access_token_is_set else "",
            api_root=settings.KITE_API_ROOT,
            rate_limiter=KiteRateLimiter.from_redis_url(settings.REDIS_URL),
        )
        exchanges = [e.upper() for e in exchanges] if exchanges else None
        try:
            with client:
                result = instruments_refresh(client=client, exchanges=exchanges, force=force)
        except (KiteError, InstrumentDumpSuspicious) as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(result.summary())

    @staticmethod
    def _account(label: str | None) -> KiteAccount:
        if label:
            account = KiteAccount.objects.filter(label=label).first()
            if account is None:
                raise CommandError(f"no Kite account labelled {label!r}")
            return account
        account = (
            account_list_streamable().first()
            or KiteAccount.objects.exclude(status=KiteAccount.Status.DISABLED).order_by("pk").first()
        )
        if account is None:
            raise CommandError("no Kite account: add one in the admin (its API key downloads the dump)")
        return account
