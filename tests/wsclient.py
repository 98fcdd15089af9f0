"""A blocking WebSocket client for tests that is safe over TLS.

websockets' own sync client reads the socket in a background thread while
the caller writes from its thread; over TLS that is two threads in one
OpenSSL session at once, which OpenSSL forbids. Under load it loses a write:
the upgrade request after the TLS handshake never reaches the wire and the
client waits for a response that cannot come (what CI hit). Here the asyncio
client runs on an event loop of its own thread, so every TLS call happens in
that one thread; callers block on its results.

    with connect(url, ssl=ctx, open_timeout=10) as ws:
        ws.send("hello")
        reply = ws.recv(timeout=5)      # TimeoutError after 5 s; ConnectionClosed when closed
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as _connect

__all__ = ["connect", "WebSocket"]


class WebSocket:
    """One client connection, driven from its own event-loop thread."""

    def __init__(self, url: str, **kw: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ws-client", daemon=True)
        self._thread.start()
        try:
            self.ws: ClientConnection = self._call(self._open(url, **kw))
        except BaseException:
            self._stop()
            raise

    @staticmethod
    async def _open(url: str, **kw: Any) -> ClientConnection:
        return await _connect(url, **kw)

    def _call(self, coro: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def send(self, message: str | bytes) -> None:
        self._call(self.ws.send(message))

    def recv(self, timeout: float | None = None) -> Any:
        """The next message; TimeoutError when none came within ``timeout``
        (nothing is lost: the message stays queued), ConnectionClosed when
        the connection closed."""
        return self._call(asyncio.wait_for(self.ws.recv(), timeout))

    def close(self) -> None:
        if self._thread.is_alive():
            try:
                self._call(self.ws.close(), timeout=15)
            finally:
                self._stop()

    def _stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> WebSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(url: str, **kw: Any) -> WebSocket:
    """Open a connection (``websockets.asyncio.client.connect``'s keywords:
    ``ssl``, ``open_timeout``, ``additional_headers``, ``subprotocols``...)."""
    return WebSocket(url, **kw)
