"""The ASGI guard in front of the app: the API token, the request-body size limit (413) and request
metrics by route template."""

# (no "from __future__ import annotations", as in vptune.serve)

import asyncio
import hmac
import json
import time
from typing import Any

from vptune.serving_limits import ApiError

OPEN_PATHS = frozenset({"/healthz"})  # answered without the token (liveness probes)


class _BodyTooLarge(Exception):
    pass


def error_body(status: int, message: str, type_: str = "") -> dict[str, Any]:
    e = ApiError(status, message, type_)
    return {"error": {"status": status, "type": e.type, "message": message}}


def token_ok(headers: dict[bytes, bytes], token: str) -> bool:
    """Whether ``Authorization: Bearer <token>`` carries ``token`` (constant-time comparison)."""
    scheme, _, given = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


class GuardMiddleware:
    """Refuses a request without the API token (when one is set) with 401 and request bodies over
    ``max_body`` (Content-Length or streamed count) with 413; records request counts and latency."""

    def __init__(self, app: Any, max_body: int, metrics: Any, token: str | None = None) -> None:
        self.app, self.max_body, self.metrics, self.token = app, max_body, metrics, token

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        state = {"status": 500, "started": False, "received": 0}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                state["status"], state["started"] = int(message["status"]), True
            await send(message)

        async def receive_wrapper() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_body:
                    raise _BodyTooLarge()
            return message

        headers = dict(scope.get("headers") or [])
        try:
            if self.token and scope.get("path") not in OPEN_PATHS and not token_ok(headers, self.token):
                await send_json(send_wrapper, 401, error_body(401, "send 'Authorization: Bearer <token>'"),
                                [(b"www-authenticate", b"Bearer")])
                return
            if _content_length(headers) > self.max_body:
                raise _BodyTooLarge()
            await self.app(scope, receive_wrapper, send_wrapper)
        except _BodyTooLarge:
            if not state["started"]:
                await self._drain(receive, state["received"])
                await send_json(send_wrapper, 413, error_body(413, f"request body exceeds {self.max_body} bytes"))
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(scope.get("method", ""), template, str(state["status"])).inc()
            self.metrics.latency.labels(template).observe(time.perf_counter() - t0)

    async def _drain(self, receive: Any, received: int) -> None:
        """Read (and drop) the rest of a refused body, up to a bound, so that the client is still
        reading when the 413 arrives instead of seeing the connection reset mid-upload."""
        limit = max(4 * self.max_body, 8 * 1024 * 1024)
        try:
            while received <= limit:
                message = await asyncio.wait_for(receive(), timeout=5.0)
                if message["type"] != "http.request":
                    return
                received += len(message.get("body", b""))
                if not message.get("more_body", False):
                    return
        except (asyncio.TimeoutError, OSError):
            return


def _content_length(headers: dict[bytes, bytes]) -> int:
    try:
        return int(headers.get(b"content-length", b"0") or 0)
    except ValueError:
        return 0


async def send_json(send: Any, status: int, body: dict[str, Any], extra: list | None = None) -> None:
    data = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(data)).encode()),
        (b"connection", b"close"),
        *(extra or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
