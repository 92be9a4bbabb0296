"""X-Request-ID: accepted from the client (or a proxy) or generated, bound into every log line.

The id is on ``request.request_id``, in structlog's context for the request's log lines, in
the response's ``X-Request-ID`` header and in every API error envelope.
"""

import re
import uuid

import structlog
from asgiref.sync import iscoroutinefunction, markcoroutinefunction

REQUEST_ID_HEADER = "X-Request-ID"
_ACCEPTED = re.compile(r"[A-Za-z0-9._:-]{1,64}")
"""A client's id is kept only if it is short and plain (it goes into logs and headers)."""


def request_id_for(request) -> str:
    offered = request.headers.get(REQUEST_ID_HEADER, "")
    return offered if _ACCEPTED.fullmatch(offered) else uuid.uuid4().hex


class RequestIdMiddleware:
    """Binds the request id around the view, sync or async."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request):
        if self.is_async:
            return self._acall(request)
        request.request_id = request_id_for(request)
        with structlog.contextvars.bound_contextvars(request_id=request.request_id):
            response = self.get_response(request)
        response[REQUEST_ID_HEADER] = request.request_id
        return response

    async def _acall(self, request):
        request.request_id = request_id_for(request)
        with structlog.contextvars.bound_contextvars(request_id=request.request_id):
            response = await self.get_response(request)
        response[REQUEST_ID_HEADER] = request.request_id
        return response
