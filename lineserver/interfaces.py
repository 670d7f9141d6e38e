"""The plug points of lineserver, as zope.interface contracts.

Casing tells who owns a name: these contracts are ours, so their methods
use PEP 8 names; Twisted's own interfaces keep Twisted's camelCase.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from lineserver.flow import Pause


class ISink(Interface):
    """
    Where accepted lines go: a file, stdout, another server, a stream.

    A sink is driven by one L{lineserver.flow.SinkQueue} writer that keeps at
    most one batch in flight (unless the sink provides C{IPipelinedSink}):
    C{write} is not called again until the Deferred of the previous call
    has fired.  That single outstanding
    Deferred is the sink's whole backpressure signal: a slow sink simply
    fires late, the queue fills, and the connections feeding it are paused.
    """

    def open() -> object:
        """
        Acquire the sink's resources (open a file, connect to a server).

        @return: a Deferred that fires when the sink can take C{write}
            calls, or fails if it cannot (the supervisor then retries).
        """

    def write(lines: list[bytes]) -> object:
        """
        Take a batch of complete lines, each without its terminator.

        The bytes are exactly what the client sent (no decoding); a sink
        that stores lines adds its own terminator.

        @return: a Deferred that fires when the batch has been handed off
            durably enough that the sink will not lose it on a clean
            C{close}; a failure means the batch was not taken, and the
            queue keeps it for the sink's next incarnation.
        """

    def close() -> object:
        """
        Flush what was written and release every resource.

        @return: a Deferred that fires when every written batch is out.
        """


class ISinkFactory(Interface):
    """
    Makes a fresh L{ISink}: the supervisor calls it again after a crash.
    """

    description = Attribute("A short text for logs, like 'file:lines.log'.")

    def __call__() -> ISink:
        """
        @return: a new, unopened sink.
        """


class IConnection(Interface):
    """
    What a handler may know and do about the connection it serves.
    """

    peer = Attribute("The peer's address (an IAddress).")
    identity = Attribute("A short text naming this connection in log lines.")
    tls_subject = Attribute(
        "The verified client certificate's subject as text, or None."
    )

    def write(data: bytes) -> None:
        """
        Write raw bytes back to the client; flow-controlled like echo.
        """

    def send_error(code: str, detail: str = "") -> None:
        """
        Send one C{ERR <code> [detail]} line and close the connection.
        """

    def producer(reason: Pause) -> object:
        """
        @return: an IPushProducer whose pause stops reading from this
            connection for C{reason} (and whose resume releases only that
            reason), to register with whatever this connection feeds.
        """


class ILineHandler(Interface):
    """
    Per-connection logic for complete lines.

    The protocol hands over every line that one read completed at once, so a
    handler costs one Python call per read, not per line.  If
    C{lines_received} raises, the protocol logs it with the connection's
    identity, counts the batch's lines as failed, builds a fresh handler
    from the factory, and the connection goes on.  A handler may raise
    L{lineserver.handlers.LineFailed} to name the one line that failed; the
    lines after it then go to the fresh handler.
    """

    def lines_received(lines: list[bytes], raw: bytes) -> None:
        """
        Handle a batch of complete lines.

        @param lines: each line without its terminator (a CR before the LF
            is stripped).
        @param raw: the same lines exactly as they arrived, terminators
            included, for handlers (like echo) that reply byte for byte.
        """

    def connection_lost() -> None:
        """
        The connection is gone; drop per-connection state.
        """


class ILineHandlerFactory(Interface):
    """
    Builds one handler per connection, and again after a handler fails.
    """

    def __call__(connection: IConnection) -> ILineHandler:
        """
        @return: a handler for C{connection}.
        """


class ISupervisor(Interface):
    """
    A parent that wants to hear when a permanent child has crashed.
    """

    def child_failed(child: object, reason: object) -> None:
        """
        Called by a child service that can no longer do its job.

        @param child: the child service itself.
        @param reason: a L{twisted.python.failure.Failure}.
        """
