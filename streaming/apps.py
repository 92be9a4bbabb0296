from django.apps import AppConfig
from django.conf import settings


class StreamingConfig(AppConfig):
    name = "streaming"
    verbose_name = "Streaming engine"

    def ready(self) -> None:
        from streaming.control import ChangeNotifier, control_channel
        from tickerproj.redis_connection import sentinel_master_check

        if settings.REDIS_SENTINEL is not None:
            # A clear start-up error naming the master, not a stream of connection errors.
            sentinel_master_check(settings.REDIS_SENTINEL)

        # Built once from settings; services reach it through the app registry.
        self.change_notifier = ChangeNotifier(
            redis_url=settings.REDIS_URL, channel=control_channel(settings.CHANNEL_LAYER_PREFIX)
        )
