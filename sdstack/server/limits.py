"""A cap on request body size (base64 images make bodies large; a runaway client must not exhaust memory)."""

from __future__ import annotations

import json

DEFAULT_MAX_BODY = 256 * 1024 * 1024


def _too_large(limit: int) -> tuple[dict, bytes]:
    body = json.dumps({"error": "RequestTooLarge", "detail": f"request body over this server's limit of {limit} bytes",
                       "field": "body", "errors": []}).encode()
    start = {"type": "http.response.start", "status": 413,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    return start, body


class BodyLimitMiddleware:
    """413 for a declared Content-Length over the limit; a streamed body is cut off once it passes it."""

    def __init__(self, app, max_body: int = DEFAULT_MAX_BODY):
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            start, body = _too_large(self.max_body)
            await send(start)
            await send({"type": "http.response.body", "body": body})
            return
        seen, over, started = 0, False, False

        async def limited_receive():
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:   # stop reading: to the app this looks like a client that went away
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, limited_receive, tracking_send)
        if over and not started:
            start, body = _too_large(self.max_body)
            await send(start)
            await send({"type": "http.response.body", "body": body})
