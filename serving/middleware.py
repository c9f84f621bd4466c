"""ASGI middleware: a request body size limit and the ``X-Model-Version`` header.

Both are plain ASGI (not Starlette's ``BaseHTTPMiddleware``), so they see the
raw body messages and response start, and add no task per request.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MODEL_VERSION_HEADER = "X-Model-Version"
_VERSION_SLOT = "emarec.model_version"
_MAX_LENGTH_DIGITS = 18


class _VersionSlot:
    """Where a handler leaves the version that produced its response."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: str | None = None


def stamp_model_version(connection: HTTPConnection, version: str) -> None:
    """Make the response to this request carry ``X-Model-Version``.

    Args:
        connection: the request being handled.
        version: the model version that produced (or is producing) it.
    """
    slot = connection.scope.get(_VERSION_SLOT)
    if isinstance(slot, _VersionSlot):
        slot.value = version


class ModelVersionHeader:
    """Adds ``X-Model-Version`` to responses whose handler stamped a version.

    The slot is a mutable object put in the scope, so the stamp reaches the
    response start even if a layer in between copies the scope.
    """

    def __init__(self, app: ASGIApp) -> None:
        """Wrap an app.

        Args:
            app: the ASGI app.
        """
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        slot = _VersionSlot()
        scope[_VERSION_SLOT] = slot

        async def send_with_version(message: Message) -> None:
            if message["type"] == "http.response.start" and slot.value is not None:
                header = (MODEL_VERSION_HEADER.lower().encode(), slot.value.encode())
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        await self.app(scope, receive, send_with_version)


class BodySizeLimit:
    """Answers 413 to request bodies over ``max_bytes``.

    A declared ``Content-Length`` over the limit is refused before any byte
    is read; otherwise the body is read and counted as it streams (chunked
    bodies declare no length), at most ``max_bytes`` are buffered, and the
    app then receives the whole body at once.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        """Wrap an app.

        Args:
            app: the ASGI app.
            max_bytes: largest body accepted.
        """
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared, problem = _content_length(scope)
        if problem is not None:
            await _refuse(scope, receive, send, 400, problem)
            return
        if declared is not None and declared > self.max_bytes:
            await self._too_large(scope, receive, send, f"of {declared} bytes ")
            return
        body = await self._read(scope, receive, send)
        if body is None:
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        """The whole body, or ``None`` when it was refused or the client left."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(scope, receive, send, "")
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _too_large(
        self, scope: Scope, receive: Receive, send: Send, what: str
    ) -> None:
        detail = (
            f"request body {what}is over this server's limit of {self.max_bytes} "
            "bytes; send a smaller request (e.g. fewer users per batch)"
        )
        logger.info("413: %s", detail)
        await _refuse(scope, receive, send, 413, detail)


def _content_length(scope: Scope) -> tuple[int | None, str | None]:
    """The declared body length, or a reason it is unusable."""
    values = [v for k, v in scope.get("headers", []) if k.lower() == b"content-length"]
    if not values:
        return None, None
    if len(set(values)) > 1:
        return None, "conflicting Content-Length headers"
    text = values[0].decode("latin-1").strip()
    if not (text.isascii() and text.isdigit()):
        return None, f"Content-Length {text[:40]!r} is not a non-negative integer"
    digits = text.lstrip("0") or "0"
    # Longer numbers are over any limit, and int() refuses huge digit runs.
    if len(digits) > _MAX_LENGTH_DIGITS:
        return 10**_MAX_LENGTH_DIGITS, None
    return int(digits), None


async def _refuse(
    scope: Scope, receive: Receive, send: Send, status: int, detail: str
) -> None:
    # The unread rest of the body stays on the connection, so it must close.
    response = JSONResponse(
        {"detail": detail}, status_code=status, headers={"Connection": "close"}
    )
    await response(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the buffered body over, then defers to the real
    one (which reports a disconnect when the client goes)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
