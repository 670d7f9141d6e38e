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

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from typing_extensions import override
from zope.interface import implementer

from lineserver.twisted_internals import (
    HAProxyProtocolWrapper,
    HAProxyWrappingFactory,
    proxy_header_received,
)

PREFIX = "haproxy:"


class HeaderAwareProxyWrapper(HAProxyProtocolWrapper):
    """
    A PROXY protocol wrapper that tells its protocol when the header is in.
    """

    @override
    def dataReceived(self, data: bytes) -> None:
        had_header = proxy_header_received(self)
        super().dataReceived(data)
        if not had_header and proxy_header_received(self):
            notify = getattr(self.wrappedProtocol, "proxy_header_received", None)
            if notify is not None:
                notify()


class HeaderAwareProxyFactory(HAProxyWrappingFactory):
    protocol = HeaderAwareProxyWrapper  # type: ignore[assignment]


@implementer(IStreamServerEndpoint)
class WrappingServerEndpoint:
    """
    Listens on another endpoint with each connection's protocol wrapped.

    Twisted's own (C{_WrapperServerEndpoint}) is private, and its public
    C{proxyEndpoint} cannot take our factory; this is the same few lines
    on public interfaces.
    """

    def __init__(
        self,
        inner: IStreamServerEndpoint,
        wrap: Callable[[IProtocolFactory], IProtocolFactory],
    ) -> None:
        self.inner = inner
        self.wrap = wrap

    def listen(
        self,
        protocolFactory: IProtocolFactory,  # noqa: N803 (the interface's name)
    ) -> Deferred[IListeningPort]:
        listening: Deferred[IListeningPort] = self.inner.listen(
            self.wrap(protocolFactory)
        )
        return listening


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
    return WrappingServerEndpoint(inner, HeaderAwareProxyFactory)
