"""The pre-v1 history path, kept for old clients: a permanent redirect into the API v1."""

from django.http import HttpRequest, HttpResponsePermanentRedirect
from django.urls import reverse


def history_redirect(request: HttpRequest, instrument_token: int) -> HttpResponsePermanentRedirect:
    """``/api/history/<token>?...`` answers 308 to ``/api/v1/history/<token>?...``.

    308 keeps the method, and clients keep the ``Authorization`` header on a same-origin
    redirect, so a program that followed redirects before works unchanged.
    """
    target = reverse("api-v1:history", args=[instrument_token])
    if request.META.get("QUERY_STRING"):
        target = f"{target}?{request.META['QUERY_STRING']}"
    response = HttpResponsePermanentRedirect(target)
    response.status_code = 308
    return response
