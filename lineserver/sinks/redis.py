"""The Redis Streams sinks: one stream entry per line, on one node or a cluster.

How a batch travels (docs/redis.md says it for users):

  - A batch's lines are split by stream key (one key on a single node;
    on a cluster, each connection's lines go to one of C{shards} keys).
    Each part becomes one transaction, pipelined in one write:
    C{MULTI}, one C{XADD} per line, C{EXEC} (and C{WAIT n} with C{wait=}).
    A transaction is all or nothing, so a batch is never half in Redis
    after an error reply: it is retried whole, and nothing Redis already
    confirmed is sent twice.
  - One transaction per key is in flight at a time, so a key's entries
    keep the order the lines arrived in; several batches (C{inflight})
    wait in the sink meanwhile (L{IPipelinedSink}).
  - A batch's Deferred fires once every one of its transactions was
    confirmed by C{EXEC} (and C{WAIT}), in the order the batches came.
  - The sink never fails a batch: a server that is down, a wrong
    password, a missing ACL permission, C{OOM} under C{maxmemory}: the
    batch is held and retried with a capped backoff, one log line every
    few seconds says why, and the queue behind it fills and pauses the
    clients (backpressure, not loss, not a crash).
  - What can be duplicated: a transaction whose C{EXEC} was sent and
    whose reply was lost with the connection is sent again on the next
    one (Redis may have run it).  Nothing else.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory
from twisted.internet.ssl import (
    Certificate,
    PrivateCertificate,
    optionsForClientTLS,
    platformTrust,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import alsoProvides, implementer

from lineserver.interfaces import ISink, ISinkFactory
from lineserver.sinks import IPipelinedSink, IWantsOrigin, Scheme, SinkURL
from lineserver.sinks.redis_client import RedisProtocol
from lineserver.sinks.redis_config import OPTIONS, RedisConfig, parse_redis_url
from lineserver.sinks.redis_resp import RedisError, Reply, encode_command
from lineserver.sinks.redis_slots import (
    Redirect,
    key_slot,
    parse_redirect,
    parse_slots,
)

log = Logger(namespace="lineserver.sink.redis")

#: Longest wait between two attempts, in seconds.
MAX_BACKOFF = 5.0
#: At most one log line per kind of trouble in this many seconds.
LOG_EVERY = 5.0
#: Redirections in a row (MOVED, ASK) a transaction follows at once;
#: past that the nodes disagree (a migration half set up, or undone) and
#: it backs off like any outage instead of bouncing between them.
MAX_REDIRECTS = 5

Node = tuple[str, int]


def backoff(attempt: int) -> float:
    """
    @return: seconds to wait before attempt C{attempt} (1, 2, ...):
        doubling from 0.1 s, capped at L{MAX_BACKOFF}, with jitter.
    """
    base = min(MAX_BACKOFF, 0.1 * 2 ** min(attempt - 1, 10))
    return float(base * random.uniform(0.5, 1.0))


@dataclass(eq=False)
class _Transaction:
    """
    The lines of one batch for one key: one MULTI/XADD.../EXEC.
    """

    key: str
    lines: list[bytes]
    done: bool = False
    sending: bool = False
    #: Written and confirmed, but WAIT has not yet reported enough replicas.
    replicating: bool = False
    #: Send with ASKING to this node (one ASK redirection).
    ask: Node | None = None
    #: Not before this reactor time (backing off after an error).
    not_before: float = 0.0
    attempts: int = 0
    #: Redirections followed since the last reply that was not one.
    redirects: int = 0


@dataclass(eq=False)
class _Batch:
    transactions: list[_Transaction]
    done: Deferred[None] = field(default_factory=Deferred)
    lines: int = 0


class _Node:
    """
    One connection to one Redis node, made on demand, remade with backoff.
    """

    def __init__(self, sink: RedisStreamSink, address: Node) -> None:
        self.sink = sink
        self.address = address
        self.protocol: RedisProtocol | None = None
        self.connecting = False
        self.failures = 0
        self._retry: IDelayedCall | None = None

    def ensure(self) -> None:
        if self.protocol is not None or self.connecting or self._retry is not None:
            return
        if self.sink.closed:
            return
        self.connecting = True
        endpoint = client_endpoint(self.sink.reactor, self.sink.config, self.address)
        factory = Factory.forProtocol(RedisProtocol)
        factory.noisy = False
        connected = endpoint.connect(factory)
        connected.addCallback(self._handshake)
        connected.addErrback(self._failed)

    def _handshake(self, protocol: RedisProtocol) -> Deferred[None]:
        config = self.sink.config
        commands: list[list[bytes | str | int]] = []
        if config.password is not None:
            auth: list[bytes | str | int] = ["AUTH"]
            if config.username:
                auth.append(config.username)
            auth.append(config.password)
            commands.append(auth)
        if config.db:
            commands.append(["SELECT", config.db])
        commands.append(["PING"])
        replies = protocol.pipeline(commands)

        def check(results: list[Reply]) -> None:
            for reply in results:
                if isinstance(reply, RedisError):
                    protocol.close()
                    raise _Refused(f"refused the connection: {reply.message}")
            self._ready(protocol)

        return replies.addCallback(check)

    def _ready(self, protocol: RedisProtocol) -> None:
        self.connecting = False
        if self.sink.closed:
            protocol.close()
            return
        if self.failures:
            log.info("Redis {node} reachable again", node=_describe(self.address))
        self.failures = 0
        self.protocol = protocol
        protocol.closed.addCallback(self._lost, protocol)
        self.sink.node_ready(self)

    def _lost(self, _: None, protocol: RedisProtocol) -> None:
        reason = protocol.lost_reason
        why = reason.value if reason is not None else "closed"
        if self.protocol is protocol:
            self.protocol = None
            if not self.sink.closed:
                self.sink.trouble(
                    "lost", f"connection to Redis {_describe(self.address)} lost: {why}"
                )
                self._schedule()
                self.sink.node_lost(self)

    def _failed(self, reason: Failure) -> None:
        self.connecting = False
        error = reason.value
        if isinstance(error, Exception) and reason.check(_Refused):
            what = str(error)
        else:
            what = f"unreachable: {error}"
        self.sink.trouble("connect", f"Redis {_describe(self.address)} {what}")
        self._schedule()
        self.sink.node_lost(self)

    def _schedule(self) -> None:
        self.failures += 1
        if self._retry is None and not self.sink.closed:
            self._retry = self.sink.reactor.callLater(
                backoff(self.failures), self._again
            )

    def _again(self) -> None:
        self._retry = None
        if self.sink.has_work():
            self.ensure()

    def close(self) -> None:
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self.protocol is not None:
            self.protocol.close()
            self.protocol = None


class _Refused(Exception):
    """
    The node answered the handshake with an error (a wrong password).
    """


def client_endpoint(reactor: Any, config: RedisConfig, address: Node) -> Any:
    """
    @return: the endpoint for one node: TCP, or TLS (C{rediss://}) checking
        the node's certificate against C{ca=} (else the system's trust
        store) and its name, with C{cert=}/C{key=} as our certificate.
    """
    host, port = address
    endpoint: Any = HostnameEndpoint(reactor, host, port, timeout=5)
    if not config.tls:
        return endpoint
    trust: Any = platformTrust()
    if config.ca is not None:
        trust = Certificate.loadPEM(Path(config.ca).read_bytes())
    mine = None
    if config.cert is not None and config.key is not None:
        mine = PrivateCertificate.loadPEM(
            Path(config.cert).read_bytes() + b"\n" + Path(config.key).read_bytes()
        )
    options = optionsForClientTLS(host, trustRoot=trust, clientCertificate=mine)
    return wrapClientTLS(options, endpoint)


def _describe(address: Node) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@implementer(ISink, IPipelinedSink)
class RedisStreamSink:
    """
    Appends each line to a Redis stream (or, on a cluster, to one of its
    shard streams) with XADD; see the module's docstring for the promise.
    """

    def __init__(self, config: RedisConfig, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.config = config
        self.reactor = reactor
        self.max_in_flight = config.inflight
        self.closed = False
        self._batches: deque[_Batch] = deque()
        self._nodes: dict[Node, _Node] = {}
        self._slots: dict[int, Node] = {}
        self._slots_stale = config.cluster
        self._refreshing = False
        self._timer: IDelayedCall | None = None
        self._logged: dict[str, float] = {}
        self._fallback = 0
        self._closing: Deferred[None] | None = None
        self._empty: list[Deferred[None]] = []

    # The ISink contract.

    def open(self) -> Deferred[None]:
        """
        Start connecting; lines are held until Redis takes them, so a
        Redis that is down at start is an outage like any other.
        """
        for address in self.config.nodes:
            self._node(address).ensure()
        return succeed(None)

    def write(self, lines: list[bytes]) -> Deferred[None]:
        config = self.config
        by_key: dict[str, list[bytes]] = {}
        self._fallback += 1
        for line in lines:
            origin = getattr(line, "connection", None)
            key = config.key_for(origin, self._fallback)
            by_key.setdefault(key, []).append(line)
        batch = _Batch([_Transaction(key, part) for key, part in by_key.items()])
        batch.lines = len(lines)
        self._batches.append(batch)
        self._kick()
        return batch.done

    def close(self) -> Deferred[None]:
        """
        Wait until Redis has confirmed every batch, then disconnect.
        Cancelling gives up what is left (the server's stop deadline).
        """
        if self._closing is None:
            self._closing = Deferred(canceller=lambda _: self._shut())
            if not self._batches:
                self._shut()
            else:
                waiter: Deferred[None] = Deferred()
                self._empty.append(waiter)
                waiter.addCallback(lambda _: self._shut())
        return self._closing

    def _shut(self) -> None:
        self.closed = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        for node in self._nodes.values():
            node.close()
        if self._closing is not None and not self._closing.called:
            self._closing.callback(None)

    # What the nodes tell the sink.

    def has_work(self) -> bool:
        return bool(self._batches) or self._slots_stale

    def node_ready(self, node: _Node) -> None:
        self._kick()

    def node_lost(self, node: _Node) -> None:
        if self.config.cluster:
            self._slots_stale = True
        if self.config.cluster:
            self._kick()

    def trouble(self, kind: str, message: str) -> None:
        """
        Log C{message}, at most once every L{LOG_EVERY} seconds per kind.
        """
        now = self.reactor.seconds()
        if now - self._logged.get(kind, -LOG_EVERY) < LOG_EVERY:
            return
        self._logged[kind] = now
        held = sum(batch.lines for batch in self._batches)
        log.warn("{message}; {held} lines held, retrying", message=message, held=held)

    def notice(self, kind: str, message: str) -> None:
        """
        Log C{message} at info level, at most once every L{LOG_EVERY}
        seconds per kind: the cluster changing under the sink, not trouble.
        """
        now = self.reactor.seconds()
        if now - self._logged.get(kind, -LOG_EVERY) < LOG_EVERY:
            return
        self._logged[kind] = now
        log.info("{message}", message=message)

    # Sending.

    def _node(self, address: Node) -> _Node:
        node = self._nodes.get(address)
        if node is None:
            node = self._nodes[address] = _Node(self, address)
        return node

    def _kick(self) -> None:
        if self.closed:
            return
        if self.config.cluster and self._slots_stale:
            self._refresh_slots()
            if not self._slots:
                return
        now = self.reactor.seconds()
        seen: set[str] = set()
        soonest: float | None = None
        for batch in self._batches:
            for transaction in batch.transactions:
                if transaction.done or transaction.key in seen:
                    continue
                seen.add(transaction.key)
                if transaction.sending:
                    continue
                if transaction.not_before > now:
                    when = transaction.not_before
                    soonest = when if soonest is None else min(soonest, when)
                    continue
                self._send(transaction)
        if soonest is not None:
            self._wake_at(soonest)

    def _wake_at(self, when: float) -> None:
        delay = max(0.0, when - self.reactor.seconds())
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= when:
                return
            self._timer.cancel()
        self._timer = self.reactor.callLater(delay, self._wake)

    def _wake(self) -> None:
        self._timer = None
        self._kick()

    def _address_for(self, transaction: _Transaction) -> Node | None:
        if transaction.ask is not None:
            return transaction.ask
        if not self.config.cluster:
            return self.config.nodes[0]
        return self._slots.get(key_slot(transaction.key.encode()))

    def _send(self, transaction: _Transaction) -> None:
        address = self._address_for(transaction)
        if address is None:
            self._slots_stale = True
            self.trouble("slots", f"no Redis node serves the slot of {transaction.key}")
            self._retry_later(transaction)
            return
        node = self._node(address)
        protocol = node.protocol
        if protocol is None or not protocol.connected_:
            node.ensure()
            return
        commands: list[list[bytes | str | int]] = []
        asked = transaction.ask is not None
        if asked:
            commands.append(["ASKING"])
        count = len(commands)
        data = b"".join(encode_command(c) for c in commands)
        if not transaction.replicating:
            data += encode_transaction(self.config, transaction.key, transaction.lines)
            count += len(transaction.lines) + 2
        if self.config.wait:
            data += encode_command(["WAIT", self.config.wait, self.config.wait_timeout])
            count += 1
        transaction.sending = True
        replies = protocol.send(data, count)
        replies.addCallbacks(
            self._replied,
            self._lost_replies,
            callbackArgs=(transaction, address, asked),
            errbackArgs=(transaction,),
        )

    def _lost_replies(self, reason: Failure, transaction: _Transaction) -> None:
        # The connection went with the replies: the node reconnects and
        # the transaction goes again (Redis may have run it: a duplicate).
        transaction.sending = False
        transaction.attempts += 1
        transaction.not_before = self.reactor.seconds()
        self._wake_at(transaction.not_before)

    def _replied(
        self,
        replies: list[Reply],
        transaction: _Transaction,
        address: Node,
        asked: bool,
    ) -> None:
        transaction.sending = False
        transaction.ask = None
        if transaction.replicating:
            self._replicated(transaction, replies[-1], address)
            return
        offset = 1 if asked else 0
        exec_reply = replies[offset + 1 + len(transaction.lines)]
        if isinstance(exec_reply, list):
            failed = [
                line
                for line, reply in zip(transaction.lines, exec_reply, strict=False)
                if isinstance(reply, RedisError)
            ]
            if failed:
                # Runtime errors inside EXEC (a key of another type): the
                # lines that went in stay in; only the others go again.
                first = next(r for r in exec_reply if isinstance(r, RedisError))
                assert isinstance(first, RedisError)
                self.trouble(
                    "refused",
                    f"Redis {_describe(address)} refused lines: {first.message}",
                )
                transaction.lines = failed
                self._retry_later(transaction)
                return
            if self.config.wait:
                transaction.replicating = True
                self._replicated(transaction, replies[-1], address)
                return
            self._done(transaction)
            return
        # EXEC aborted (or never ran): nothing of it is in Redis.
        cause = next(
            (r for r in replies if isinstance(r, RedisError) and r.code != "EXECABORT"),
            exec_reply
            if isinstance(exec_reply, RedisError)
            else RedisError("EXEC failed"),
        )
        assert isinstance(cause, RedisError)
        redirect = parse_redirect(cause.message, address[0])
        if redirect is not None and transaction.redirects < MAX_REDIRECTS:
            transaction.redirects += 1
            self._redirected(transaction, redirect, address)
            self._kick()
            return
        if redirect is not None:
            self.trouble(
                "redirects",
                f"Redis Cluster slot {redirect.slot} ({transaction.key}):"
                f" {MAX_REDIRECTS} redirections in a row, the last"
                f" {cause.message!r} from {_describe(address)}; the nodes"
                " disagree about who serves it",
            )
        else:
            self.trouble(
                cause.code, f"Redis {_describe(address)} refused lines: {cause.message}"
            )
        if cause.code in ("CLUSTERDOWN", "TRYAGAIN", "MOVED", "ASK"):
            self._slots_stale = self.config.cluster
        # Backing off ends a run of redirections: the next reply may
        # follow MAX_REDIRECTS again.
        transaction.redirects = 0
        self._retry_later(transaction)

    def _redirected(
        self, transaction: _Transaction, redirect: Redirect, address: Node
    ) -> None:
        """
        Follow C{-ASK} once (the slot is migrating and the key is already
        on the importing node: the map stays as it is), or C{-MOVED} for
        good (the slot has a new owner: the map is corrected now and asked
        for again).
        """
        slot, node = redirect.slot, redirect.node
        if redirect.ask:
            transaction.ask = node
            self.notice(
                f"ask {slot}",
                f"Redis Cluster slot {slot} ({transaction.key}) is migrating"
                f" from {_describe(address)} to {_describe(node)}:"
                " writing there after ASKING (-ASK)",
            )
            return
        if self._slots.get(slot) != node:
            self.notice(
                f"moved {slot}",
                f"Redis Cluster slot {slot} ({transaction.key}) moved from"
                f" {_describe(address)} to {_describe(node)} (-MOVED):"
                " slot map updated",
            )
        self._slots[slot] = node
        self._slots_stale = True

    def _replicated(
        self, transaction: _Transaction, reply: Reply, address: Node
    ) -> None:
        if isinstance(reply, int) and reply >= self.config.wait:
            transaction.replicating = False
            self._done(transaction)
            return
        self.trouble(
            "wait",
            f"Redis {_describe(address)}: WAIT {self.config.wait}"
            f" reached {reply!r} replicas",
        )
        self._retry_later(transaction)

    def _retry_later(self, transaction: _Transaction) -> None:
        transaction.attempts += 1
        transaction.not_before = self.reactor.seconds() + backoff(transaction.attempts)
        self._kick()

    def _done(self, transaction: _Transaction) -> None:
        transaction.done = True
        transaction.redirects = 0
        batches = self._batches
        while batches and all(t.done for t in batches[0].transactions):
            batches.popleft().done.callback(None)
        if not batches:
            waiters, self._empty = self._empty, []
            for waiter in waiters:
                waiter.callback(None)
        self._kick()

    def _refresh_slots(self) -> None:
        if self._refreshing:
            return
        candidates = [n for n in self._nodes.values() if n.protocol is not None]
        if not candidates:
            for address in self.config.nodes:
                self._node(address).ensure()
            for node in list(self._nodes.values()):
                node.ensure()
            return
        node = random.choice(candidates)
        protocol = node.protocol
        assert protocol is not None
        self._refreshing = True

        def got(reply: Reply) -> None:
            self._refreshing = False
            slots = parse_slots(reply, node.address[0])
            if not slots:
                message = (
                    reply.message if isinstance(reply, RedisError) else repr(reply)[:80]
                )
                self.trouble(
                    "slots", f"no slot map from {_describe(node.address)}: {message}"
                )
                self._wake_at(self.reactor.seconds() + backoff(2))
                return
            self._slots = slots
            self._slots_stale = False
            self._kick()

        def failed(reason: Failure) -> None:
            self._refreshing = False
            self._wake_at(self.reactor.seconds() + backoff(1))

        protocol.command("CLUSTER", "SLOTS").addCallbacks(got, failed)


def encode_transaction(config: RedisConfig, key: str, lines: list[bytes]) -> bytes:
    """
    @return: C{MULTI}, one C{XADD} per line, C{EXEC}, encoded; the
        command's fixed part is encoded once, not once per line.
    """
    trim: list[bytes | str | int] = (
        ["MAXLEN", "~", config.maxlen] if config.maxlen else []
    )
    fixed = ["XADD", key, *trim, "*", "line"]
    head = encode_command(fixed)
    # encode_command(fixed) starts with "*<n>\r\n"; the full command has
    # one more argument (the line) and two per extra field.
    body = head[head.index(b"\r\n") + 2 :]
    fields = config.fields
    parts = [b"*1\r\n$5\r\nMULTI\r\n"]
    if not fields:
        prefix = b"*%d\r\n" % (len(fixed) + 1) + body
        parts += [b"%s$%d\r\n%s\r\n" % (prefix, len(line), line) for line in lines]
    else:
        for line in lines:
            extra: list[bytes | str] = []
            for name in fields:
                value = _field(line, name)
                if value is not None:
                    extra += [name, value]
            command = encode_command([*fixed, line, *extra])
            parts.append(command)
    parts.append(b"*1\r\n$4\r\nEXEC\r\n")
    return b"".join(parts)


def _field(line: bytes, name: str) -> bytes | str | None:
    if name == "peer":
        return getattr(line, "peer", None)
    if name == "conn":
        return getattr(line, "connection", None)
    received = getattr(line, "received", None)
    return None if received is None else f"{received:.6f}"


@implementer(ISinkFactory)
class RedisSinkFactory:
    """
    Makes L{RedisStreamSink}s for one URL; provides L{IWantsOrigin} when
    its sinks need to know each line's connection (a cluster shards by it;
    C{fields=} may store it).
    """

    def __init__(self, config: RedisConfig, reactor: Any) -> None:
        self.config = config
        self.reactor = reactor
        self.description = config.describe()
        if config.cluster or config.fields:
            alsoProvides(self, IWantsOrigin)

    def __call__(self) -> RedisStreamSink:
        return RedisStreamSink(self.config, self.reactor)


def _redis_factory(url: SinkURL, reactor: Any) -> ISinkFactory:
    return RedisSinkFactory(parse_redis_url(url), reactor)


redis_scheme = Scheme(_redis_factory, OPTIONS)
