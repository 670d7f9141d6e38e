"""PROXY protocol ports (C{haproxy:} descriptions) that say when the header came.

Twisted's C{haproxy:} endpoint reads the PROXY header and then passes the
connection's bytes on; nothing tells the protocol when the header itself
arrived.  A client behind HAProxy may connect and stay quiet for minutes,
so waiting for its first bytes to learn its address would leave it
unjudged (and uncounted) meanwhile.  Here the wrapper calls
C{proxy_header_received()} on the protocol it wraps, if it has one, as
soon as the header is parsed.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.endpoints import _WrapperServerEndpoint, serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.protocols.haproxy._wrapper import (
    HAProxyProtocolWrapper,
    HAProxyWrappingFactory,
)
from typing_extensions import override

PREFIX = "haproxy:"


class HeaderAwareProxyWrapper(HAProxyProtocolWrapper):
    """
    A PROXY protocol wrapper that tells its protocol when the header is in.
    """

    @override
    def dataReceived(self, data: bytes) -> None:
        had_header = self._proxyInfo is not None
        super().dataReceived(data)
        if not had_header and self._proxyInfo is not None:
            notify = getattr(self.wrappedProtocol, "proxy_header_received", None)
            if notify is not None:
                notify()


class HeaderAwareProxyFactory(HAProxyWrappingFactory):
    protocol = HeaderAwareProxyWrapper  # type: ignore[assignment]


def is_proxy_description(description: str) -> bool:
    return description.lower().startswith(PREFIX)


def proxy_endpoint(
    reactor: Any, description: str | IStreamServerEndpoint
) -> IStreamServerEndpoint:
    """
    A PROXY protocol endpoint over C{description} (given with or without
    its C{haproxy:} prefix) or over an endpoint.
    """
    if isinstance(description, str):
        if is_proxy_description(description):
            description = description[len(PREFIX) :]
        inner: IStreamServerEndpoint = serverFromString(reactor, description)
    else:
        inner = description
    endpoint: IStreamServerEndpoint = _WrapperServerEndpoint(
        inner, HeaderAwareProxyFactory
    )
    return endpoint
