"""lineserver: a supervised, flow-controlled line server on Twisted.

The public API, for embedding the server in another Twisted application;
see docs/embedding.md.
"""

from lineserver.connections import ConnectionRegistry
from lineserver.errors import ErrorCode, error_line
from lineserver.flow import PauseGate, SinkQueue
from lineserver.framing import Frames, LineFramer, LineTooLong
from lineserver.handlers import (
    AckSinkHandler,
    AckSinkHandlerFactory,
    EchoHandler,
    EchoHandlerFactory,
    LineFailed,
    PerLineHandler,
    SinkHandler,
    SinkHandlerFactory,
)
from lineserver.interfaces import (
    IConnection,
    ILineHandler,
    ILineHandlerFactory,
    ISink,
    ISinkFactory,
    ISupervisor,
)
from lineserver.listener import ListenerService
from lineserver.protocol import LineFactory, LineProtocol, ProtocolSettings
from lineserver.security import Security, SecurityConfig, SecurityConfigError
from lineserver.server import DEFAULT_PORT, LineServer, Phase, ServerConfig
from lineserver.signals import HangupReload
from lineserver.sink_service import SinkService
from lineserver.sinks import (
    ISpooled,
    SinkUnavailable,
    SinkURL,
    SinkURLError,
    sink_factory_from_url,
)
from lineserver.sinks.spooling import SpoolingSink, SpoolingSinkFactory
from lineserver.stats import Stats
from lineserver.supervisor import ChildSpec, Supervisor

__all__ = [
    "DEFAULT_PORT",
    "AckSinkHandler",
    "AckSinkHandlerFactory",
    "ChildSpec",
    "ConnectionRegistry",
    "EchoHandler",
    "EchoHandlerFactory",
    "ErrorCode",
    "Frames",
    "HangupReload",
    "IConnection",
    "ILineHandler",
    "ILineHandlerFactory",
    "ISink",
    "ISinkFactory",
    "ISpooled",
    "ISupervisor",
    "LineFactory",
    "LineFailed",
    "LineFramer",
    "LineProtocol",
    "LineServer",
    "LineTooLong",
    "ListenerService",
    "PauseGate",
    "PerLineHandler",
    "Phase",
    "ProtocolSettings",
    "Security",
    "SecurityConfig",
    "SecurityConfigError",
    "ServerConfig",
    "SinkHandler",
    "SinkHandlerFactory",
    "SinkQueue",
    "SinkService",
    "SinkURL",
    "SinkURLError",
    "SinkUnavailable",
    "SpoolingSink",
    "SpoolingSinkFactory",
    "Stats",
    "Supervisor",
    "error_line",
    "sink_factory_from_url",
]
