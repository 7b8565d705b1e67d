"""Outgoing connections to addresses someone else chose (a task's image URL, a notification channel's URL): the host
is resolved once, refused if any of its addresses is internal, and connected to at exactly the addresses that were
checked, so a DNS answer that changes between the check and the connection (rebinding) cannot redirect it."""

from __future__ import annotations

import http.client
import ipaddress
import socket
import urllib.request


class NotPublic(Exception):
    """The host resolves to a loopback, private, link-local or otherwise non-global address."""

    def __init__(self, host: str, address):
        super().__init__(f"{host} resolves to the non-public address {address}")
        self.host, self.address = host, address


def resolve_checked(host: str, port: int, *, allow_private: bool) -> list[tuple]:
    """The host's TCP addresses (getaddrinfo's tuples). Raises socket.gaierror when it does not resolve, NotPublic
    when one address is internal and ``allow_private`` is off."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not allow_private:
        for info in infos:
            address = ipaddress.ip_address(info[4][0].split("%")[0])
            if not address.is_global:
                raise NotPublic(host, address)
    return infos


def connect_first(infos: list[tuple], timeout, host: str) -> socket.socket:
    """A TCP connection to the first of the checked addresses that answers."""
    last_error: OSError | None = None
    for family, kind, proto, _name, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            if timeout is not None and timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            sock.connect(address)
            return sock
        except OSError as error:
            last_error = error
            sock.close()
    raise last_error or OSError(f"{host} has no address")


def checked_handlers(addresses, *, watch=None) -> tuple[type, type]:
    """urllib handler classes (http, https) whose connections go only to ``addresses(host, port)``'s result (which
    checks them, see ``resolve_checked``). ``watch(sock)`` is told of each socket, the TLS one too (a caption slot's
    stop shuts it down)."""

    def connect(connection) -> socket.socket:
        sock = connect_first(addresses(connection.host, connection.port), connection.timeout, connection.host)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if watch is not None:
            watch(sock)
        return sock

    class CheckedHTTPConnection(http.client.HTTPConnection):
        def connect(self):
            self.sock = connect(self)

    class CheckedHTTPSConnection(http.client.HTTPSConnection):
        def connect(self):
            self.sock = self._context.wrap_socket(connect(self), server_hostname=self.host)  # the name's certificate
            if watch is not None:
                watch(self.sock)  # the wrapped socket: wrapping detached the first one

    class CheckedHTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(CheckedHTTPConnection, req)

    class CheckedHTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(CheckedHTTPSConnection, req, context=self._context)

    return CheckedHTTPHandler, CheckedHTTPSHandler
