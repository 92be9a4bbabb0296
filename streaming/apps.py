from django.apps import AppConfig
from django.conf import settings


class StreamingConfig(AppConfig):
    name = "streaming"
    verbose_name = "Streaming engine"

    def ready(self) -> None:
        from streaming.control import ChangeNotifier, control_channel

        # Built once from settings; services reach it through the app registry.
        self.change_notifier = ChangeNotifier(
            redis_url=settings.REDIS_URL, channel=control_channel(settings.CHANNEL_LAYER_PREFIX)
        )
