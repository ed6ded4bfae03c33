"""The gateway's HTTP client for upstream calls (llama-server instances and the UI service).

aiohttp, because the proxy hot path is mostly client work: measured here against the same
llama-server, httpx spent ~880 us of CPU per request and aiohttp ~150 us. `Reply` wraps a
response in the few operations the gateway needs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping

import aiohttp

ConnectError = aiohttp.ClientConnectorError  # nothing listens there (yet, or any more)
# The request never reached the server: nothing listens (ConnectError, a ClientOSError too),
# or a pooled keep-alive connection had been closed by the server.
StaleConnection = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)
StatusError = aiohttp.ClientResponseError  # an upstream answered with an error status
TransportError = (aiohttp.ClientError, asyncio.TimeoutError)


class Reply:
    """An upstream response whose body is still streaming."""

    def __init__(self, resp: aiohttp.ClientResponse):
        self._resp = resp
        self.status_code = resp.status
        self.headers: Mapping[str, str] = resp.headers

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        async for chunk in self._resp.content.iter_any():
            yield chunk

    async def aiter_lines(self) -> AsyncIterator[str]:
        async for line in self._resp.content:
            yield line.decode(errors="replace").rstrip("\r\n")

    async def aread(self) -> bytes:
        return await self._resp.read()

    def abort(self) -> None:
        """Drop the connection under it (its instance is lost): a read under way fails."""
        self._resp.close()

    async def aclose(self) -> None:
        """Done with it: a fully read body returns the connection to the pool; an unfinished
        one closes it, which tells llama-server to stop generating."""
        if self._resp.content.at_eof():
            self._resp.release()
        else:
            self._resp.close()


# An idle pooled connection is dropped before llama-server drops it (its HTTP server closes a
# keep-alive connection idle for 5 s): reusing one it already closed fails the request's
# write ("Can not write request body"). The one retry such a failure gets goes over a new
# connection (`fresh`), never another pooled one.
KEEPALIVE_S = 4.0


class Client:
    """A connection-pooling client; create it inside the running event loop."""

    def __init__(self, read_timeout: float | None, max_connections: int = 4096):
        timeout = aiohttp.ClientTimeout(total=None, connect=5, sock_read=read_timeout)
        common = dict(
            timeout=timeout,
            auto_decompress=False,  # bytes pass through as the instance encoded them
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max_connections, keepalive_timeout=KEEPALIVE_S),
            **common,  # type: ignore[arg-type]
        )
        # A retry after a failed write goes over a new connection: the pool may hold more
        # connections the server has closed (it closed several at once, say).
        self._fresh = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max_connections, force_close=True),
            **common,  # type: ignore[arg-type]
        )

    async def send(
        self, method: str, url: str, body: bytes, headers: Mapping[str, str], fresh: bool = False
    ) -> Reply:
        """`fresh`: over a new connection, not a pooled one (for a retry)."""
        session = self._fresh if fresh else self._session
        resp = await session.request(method, url, data=body, headers=headers)
        return Reply(resp)

    async def post_json(
        self,
        url: str,
        payload: object,
        timeout: float,
        headers: Mapping[str, str] | None = None,
    ) -> object:
        async with self._session.post(
            url, json=payload, timeout=aiohttp.ClientTimeout(total=timeout), headers=headers
        ) as resp:
            resp.raise_for_status()
            return await resp.json()

    async def aclose(self) -> None:
        await self._session.close()
        await self._fresh.close()
