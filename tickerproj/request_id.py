"""One request id per HTTP request: in every log line of the request, in its response's
``X-Request-ID`` header and in every API error envelope.

:class:`RequestIdMiddleware` takes the client's (or the proxy's) ``X-Request-ID`` when it is
short and plain, else makes one, and puts it on ``request.request_id``. It binds the id into
structlog's context for the whole request, and leaves the checked id in the request's header
for django-structlog's RequestMiddleware (placed after it), which binds the same id, logs
``request_started``/``request_finished`` and passes the id on to the Celery tasks the request
queues. Every Django view, the admin and the API included, gets it from settings.MIDDLEWARE;
other code that needs an id uses :func:`request_id_for` or :func:`request_id_from_header`.
"""

from __future__ import annotations

import re
import uuid

import structlog
from asgiref.sync import iscoroutinefunction, markcoroutinefunction

REQUEST_ID_HEADER = "X-Request-ID"
_META_KEY = "HTTP_X_REQUEST_ID"
_ACCEPTED = re.compile(r"[A-Za-z0-9._:-]{1,64}")
"""A client's id is kept only if it is short and plain (it goes into logs and headers)."""


def request_id_from_header(value: str | None) -> str:
    """``value`` if it is an acceptable id, else a new random one."""
    return value if value and _ACCEPTED.fullmatch(value) else uuid.uuid4().hex


def request_id_for(request) -> str:
    """The id for ``request``, from its ``X-Request-ID`` header or new."""
    return request_id_from_header(request.META.get(_META_KEY))


class RequestIdMiddleware:
    """Gives each request its id (see the module docstring), sync or async."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    @staticmethod
    def _prepare(request) -> str:
        request.request_id = request_id_for(request)
        # django-structlog reads the header: it must see the checked id, not the raw one.
        request.META[_META_KEY] = request.request_id
        request.__dict__.pop("headers", None)  # a cached HttpHeaders would keep the raw one
        return request.request_id

    def __call__(self, request):
        if self.is_async:
            return self._acall(request)
        request_id = self._prepare(request)
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            response = self.get_response(request)
        response[REQUEST_ID_HEADER] = request_id
        return response

    async def _acall(self, request):
        request_id = self._prepare(request)
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            response = await self.get_response(request)
        response[REQUEST_ID_HEADER] = request_id
        return response
