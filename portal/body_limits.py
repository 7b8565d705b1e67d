"""ASGI: a request body capped while it arrives, before Django reads it.

Django's ASGI handler reads the whole body into a spooled file (memory, then disk) before any view runs, so a view
that reads at most N bytes still lets a chunked body (no Content-Length to refuse on) of any size fill the disk
first. This middleware counts the body's messages for the paths it is given and, past the limit, answers 413 with
the JSON the view itself gives, without reading the rest; within the limit it hands the body on unchanged."""

from __future__ import annotations

import json


def too_large_error(limit: int) -> str:
    """The 413's error, the same from this middleware and from a view that reads at most ``limit`` bytes."""
    return f"the body is larger than {limit} bytes"


class BodyLimit:
    """``BodyLimit(app, {"/api/alerts/alertmanager": 1048576, "/api/v1/": 2621440})``: bodies of those exact paths
    capped, and of every path under a key that ends with "/"."""

    def __init__(self, app, limits: dict[str, int]):
        self.app = app
        self.limits = {path: limit for path, limit in limits.items() if not path.endswith("/")}
        self.prefixes = [(path, limit) for path, limit in limits.items() if path.endswith("/")]

    def _limit(self, path: str) -> int | None:
        if path in self.limits:
            return self.limits[path]
        return next((limit for prefix, limit in self.prefixes if path.startswith(prefix)), None)

    async def __call__(self, scope, receive, send):
        limit = self._limit(scope.get("path", "")) if scope["type"] == "http" else None
        if limit is None:
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None  # the client left: nothing to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await self._refuse(send, limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, handed = b"".join(chunks), False

        async def replay():
            nonlocal handed
            if not handed:
                handed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect Django waits for

        return await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(send, limit: int) -> None:
        answer = json.dumps({"error": too_large_error(limit)}).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode()),
            (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": answer})
