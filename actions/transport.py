"""One HTTP POST to a checked address (http.client: no extra dependency, no redirects followed).

The connection goes to ``Target.address`` (the IP the SSRF guard approved) while the Host header,
TLS SNI and certificate check use the host name from the URL.
"""

from __future__ import annotations

import http.client
import socket
import ssl
from dataclasses import dataclass

from actions.ssrf import Target

USER_AGENT = "reviewapp-actions/1"
# Only a snippet of the answer is kept (for last_error); the rest is not read.
MAX_RESPONSE_BYTES = 4096


class TransportError(Exception):
    """No HTTP answer (refused, reset, timed out, TLS failure): always worth another try."""


@dataclass(frozen=True)
class HttpResult:
    status: int
    retry_after: str | None
    location: str | None
    body_snippet: str


class _PinnedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, target: Target, connect_timeout: float, read_timeout: float) -> None:
        super().__init__(target.host, target.port, timeout=connect_timeout)
        self._address = target.address
        self._read_timeout = read_timeout

    def _open_socket(self) -> socket.socket:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        sock.settimeout(self._read_timeout)
        return sock

    def connect(self) -> None:
        self.sock = self._open_socket()


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, target: Target, connect_timeout: float, read_timeout: float) -> None:
        super().__init__(target.host, target.port, timeout=connect_timeout, context=ssl.create_default_context())
        self._address = target.address
        self._read_timeout = read_timeout

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        sock.settimeout(self._read_timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


def post(
    target: Target, *, body: bytes, headers: dict[str, str], connect_timeout: float, read_timeout: float
) -> HttpResult:
    cls = _PinnedHTTPSConnection if target.scheme == "https" else _PinnedHTTPConnection
    conn = cls(target, connect_timeout, read_timeout)
    try:
        conn.putrequest("POST", target.path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", target.host_header)
        for name, value in {**headers, "User-Agent": USER_AGENT, "Content-Length": str(len(body))}.items():
            conn.putheader(name, value)
        conn.endheaders(body)
        response = conn.getresponse()
        snippet = response.read(MAX_RESPONSE_BYTES)
        return HttpResult(
            status=response.status,
            retry_after=response.getheader("Retry-After"),
            location=response.getheader("Location"),
            body_snippet=snippet.decode("utf-8", "replace"),
        )
    except (OSError, http.client.HTTPException) as exc:
        # socket.timeout, ConnectionError and ssl.SSLError are all OSError subclasses.
        kind = "timed out" if isinstance(exc, TimeoutError | socket.timeout) else exc.__class__.__name__
        raise TransportError(f"{kind}: {exc}".strip()) from exc
    finally:
        conn.close()
