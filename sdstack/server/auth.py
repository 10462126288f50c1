"""HTTP Basic auth on every route (API, docs, files, progress streams), as an ASGI middleware.

Credentials are compared with `hmac.compare_digest` against every configured pair (no early exit), so the
time taken does not tell which user names exist or how much of a password matched.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json

UNAUTHORIZED_BODY = json.dumps({"detail": "Incorrect username or password"}).encode()


def check_basic(header: bytes | None, pairs: tuple[tuple[str, str], ...]) -> bool:
    """True when `header` (the Authorization value) carries one of `pairs`."""
    if not header or not pairs:
        return False
    scheme, _, token = header.partition(b" ")
    if scheme.lower() != b"basic":
        return False
    try:
        user, sep, password = base64.b64decode(token.strip(), validate=True).partition(b":")
    except (binascii.Error, ValueError):
        return False
    if not sep:
        return False
    ok = False
    for u, p in pairs:
        same_user = hmac.compare_digest(user, u.encode())
        same_pass = hmac.compare_digest(password, p.encode())
        ok |= same_user & same_pass
    return ok


class BasicAuthMiddleware:
    """Rejects every HTTP request without valid credentials with 401 and `WWW-Authenticate: Basic`."""

    def __init__(self, app, pairs: tuple[tuple[str, str], ...]):
        self.app = app
        self.pairs = pairs

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or ()).get(b"authorization")
        if check_basic(header, self.pairs):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"www-authenticate", b'Basic realm="sdstack"'),
            (b"content-length", str(len(UNAUTHORIZED_BODY)).encode())]})
        await send({"type": "http.response.body", "body": UNAUTHORIZED_BODY})
