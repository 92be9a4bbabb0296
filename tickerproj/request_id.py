"""One request id per HTTP request, in every log line of the request and in its response.

:class:`RequestIdMiddleware` takes the client's (or the proxy's) ``X-Request-ID`` when it is
well-formed, else makes one, stores it as ``request.request_id``, and answers it in the
response's ``X-Request-ID``. django-structlog's RequestMiddleware, placed after it, binds the
same id to the log context (it reads the header this middleware has checked), logs
``request_started``/``request_finished`` and passes the id on to the Celery tasks the request
queues. Every Django view, the admin and the API included, gets it from settings.MIDDLEWARE;
other code that needs an id (a WebSocket scope, say) uses :func:`request_id_from_header`.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponse

REQUEST_ID_HEADER = "X-Request-ID"
_META_KEY = "HTTP_X_REQUEST_ID"
#: What an upstream id may look like: short, and nothing that could forge a log field or line.
_WELL_FORMED = re.compile(r"[A-Za-z0-9._:-]{8,64}")


def request_id_from_header(value: str | None) -> str:
    """``value`` if it is a well-formed id, else a new random one."""
    if value and _WELL_FORMED.fullmatch(value):
        return value
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """Gives each request its id (see the module docstring); sync and async."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse | Awaitable[HttpResponse]]):
        self.get_response = get_response
        self._async = iscoroutinefunction(get_response)
        if self._async:
            markcoroutinefunction(self)

    def _prepare(self, request: HttpRequest) -> str:
        request_id = request_id_from_header(request.META.get(_META_KEY))
        # django-structlog reads the header: it must see the checked id, not the raw one.
        request.META[_META_KEY] = request_id
        request.__dict__.pop("headers", None)  # a cached HttpHeaders would keep the raw one
        request.request_id = request_id
        return request_id

    def __call__(self, request: HttpRequest):
        if self._async:
            return self.__acall__(request)
        request_id = self._prepare(request)
        response = self.get_response(request)
        response[REQUEST_ID_HEADER] = request_id
        return response

    async def __acall__(self, request: HttpRequest) -> HttpResponse:
        request_id = self._prepare(request)
        response = await self.get_response(request)
        response[REQUEST_ID_HEADER] = request_id
        return response
