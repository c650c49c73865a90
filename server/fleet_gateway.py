"""The coordinator's public port: TLS in front of the SuperLink, forwarding only the Fleet API that sites use.

Flower 1.41's SuperLink serves the Fleet API (sites), the Control API (list/launch/stop runs, register site
keys) and the runtime API on one HTTP port, and the open-source Control API has no authentication: whoever
reaches the port can launch a run — code that every site then executes — or register a rogue site key. So the
coordinator binds the SuperLink to 127.0.0.1 only and puts this gateway on the public address: it terminates
TLS with the coordinator's certificate and passes on ``POST /v1/fleet/*`` requests (every call a SuperNode
makes, see flwr/supernode/fleet_http_client.py) unchanged, headers included, so Flower's SuperNode
authentication (signed timestamps checked by the SuperLink) still decides which site may join. Anything else
is answered 404 here and never reaches the SuperLink. The operator's Control API is then reachable only on
the coordinator host (or through an SSH tunnel to it).

A reverse proxy (nginx, envoy) configured the same way would do; this one keeps the one-command setup and is
~100 lines on uvicorn and httpx, both already Flower dependencies.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx

log = logging.getLogger("fedtune.coordinator")

FLEET_PREFIX = "/v1/fleet/"
FLEET_METHOD = "POST"
# Connection-level headers are per hop (RFC 9110 7.6.1); the rest travels unchanged.
HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te", b"trailer",
              b"upgrade", b"host"}
# A Fleet request carries at most one object chunk (Flower's 5 MiB) plus protobuf framing; larger bodies are
# refused before they are buffered.
MAX_REQUEST_BYTES = 64 * 1024 * 1024
UPSTREAM_TIMEOUT = httpx.Timeout(connect=10.0, read=300.0, write=300.0, pool=30.0)
READY_POLL_S = 0.05


@dataclass
class GatewaySettings:
    """Where the gateway listens, the SuperLink it forwards to, and its TLS files (None: plain HTTP, insecure mode)."""

    listen_host: str
    listen_port: int
    upstream_url: str  # e.g. https://127.0.0.1:8001
    certfile: Path | None = None
    keyfile: Path | None = None
    ca_cert: Path | None = None  # verifies the SuperLink's certificate on the loopback hop


async def _respond(send, status: int, text: str) -> None:
    body = text.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive) -> bytes | None:
    """The whole request body, or None when it exceeds MAX_REQUEST_BYTES."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_REQUEST_BYTES:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class FleetGateway:
    """ASGI app: forward POST /v1/fleet/* to the SuperLink, 404 for everything else."""

    def __init__(self, upstream_url: str, verify: ssl.SSLContext | bool):
        self.upstream_url = upstream_url.rstrip("/")
        self.verify = verify
        self.client: httpx.AsyncClient | None = None
        self.refused = 0  # requests answered 404 (for the log and tests)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if scope["method"] != FLEET_METHOD or not path.startswith(FLEET_PREFIX) or ".." in path:
            self.refused += 1
            log.warning("gateway: refused %s %s from %s (only the Fleet API is served on this port)",
                        scope["method"], path[:100], (scope.get("client") or ("?",))[0])
            await _respond(send, 404, "not found: this port serves only the Flower Fleet API\n")
            return
        body = await _read_body(receive)
        if body is None:
            await _respond(send, 413, "request too large\n")
            return
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in HOP_BY_HOP]
        query = scope.get("query_string", b"")
        url = self.upstream_url + path + (f"?{query.decode('latin-1')}" if query else "")
        assert self.client is not None
        try:
            request = self.client.build_request(FLEET_METHOD, url, headers=headers, content=body)
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:  # SuperLink restarting: the SuperNode retries
            await _respond(send, 502, f"SuperLink unavailable: {type(exc).__name__}\n")
            return
        try:
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": [(k, v) for k, v in response.headers.raw if k.lower() not in HOP_BY_HOP]})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.client = httpx.AsyncClient(verify=self.verify, timeout=UPSTREAM_TIMEOUT)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.client is not None:
                    await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


class GatewayThread:
    """The gateway served by uvicorn in a background thread of the coordinator process."""

    def __init__(self, settings: GatewaySettings):
        import uvicorn

        verify = ssl.create_default_context(cafile=str(settings.ca_cert)) if settings.ca_cert else False
        self.app = FleetGateway(settings.upstream_url, verify)
        tls = {} if settings.certfile is None else {"ssl_certfile": str(settings.certfile),
                                                    "ssl_keyfile": str(settings.keyfile)}
        config = uvicorn.Config(self.app, host=settings.listen_host, port=settings.listen_port, lifespan="on",
                                log_level="warning", access_log=False, **tls)
        self.server = uvicorn.Server(config)
        self.settings = settings
        self.thread = threading.Thread(target=self._serve, name="fleet-gateway", daemon=True)
        self.error: BaseException | None = None

    def _serve(self) -> None:
        try:
            asyncio.run(self.server.serve())
        except BaseException as exc:  # e.g. the port is taken: start() reports it
            self.error = exc

    def start(self, timeout_s: float = 30.0) -> None:
        """Start serving; raises RuntimeError if it is not listening within timeout_s."""
        self.thread.start()
        deadline = threading.Event()
        waited = 0.0
        while not self.server.started and self.thread.is_alive() and waited < timeout_s:
            deadline.wait(READY_POLL_S)
            waited += READY_POLL_S
        if not self.server.started:
            raise RuntimeError(f"gateway could not listen on {self.settings.listen_host}:{self.settings.listen_port}"
                               + (f": {self.error}" if self.error else ""))

    @property
    def alive(self) -> bool:
        """Whether the gateway thread is still serving."""
        return self.thread.is_alive()

    def stop(self) -> None:
        """Stop accepting connections and wait for the thread."""
        self.server.should_exit = True
        self.thread.join(timeout=10.0)
