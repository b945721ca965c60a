"""Bearer-token authentication (``qadapter serve --api-key`` or ``QADAPTER_API_KEY``).

A pure ASGI middleware: every request but ``/health`` (liveness probes carry no secrets) and the
playground's static page and files (they hold no model data; the page sends the key with its own
API calls) must carry ``Authorization: Bearer <key>``, else 401 in OpenAI's error shape. The key is
compared in constant time (:func:`hmac.compare_digest`) so its bytes cannot be guessed from timing.
"""

from __future__ import annotations

import hmac
import json

from .protocol import APIError

ENV_VAR = "QADAPTER_API_KEY"
#: paths served without the key
OPEN_PATHS = ("/health", "/", "/favicon.ico")
OPEN_PREFIXES = ("/static/",)


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


class BearerAuth:
    """Answer 401 to any request outside :data:`OPEN_PATHS` without ``Authorization: Bearer <key>``."""

    def __init__(self, app, api_key: str):
        if not api_key:
            raise ValueError("the API key must not be empty")
        self.app, self.key = app, api_key.encode("utf-8")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or is_open(scope["path"]):
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or ()).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        message = ("no API key: send the header 'Authorization: Bearer <key>'" if not header
                   else "the API key is not valid")
        err = APIError(401, message, type="invalid_request_error", code="invalid_api_key")
        body = json.dumps(err.body()).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b'Bearer realm="qadapter"')]})
        await send({"type": "http.response.body", "body": body})
