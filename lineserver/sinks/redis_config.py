"""The Redis sink URLs, parsed: pure code, so every spelling is tested.

    redis://[USER:PASSWORD@]HOST:PORT/DB?stream=KEY&maxlen=N&wait=N
    rediss://...                               (TLS)
    redis+cluster://HOST:PORT[,HOST:PORT...]/?stream=KEY&shards=N
    rediss+cluster://...                       (TLS)

docs/redis.md is the user's description of every option.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from urllib.parse import unquote

from lineserver.sinks import SinkURL, SinkURLError

SCHEMES = ("redis", "rediss", "redis+cluster", "rediss+cluster")

#: Options every Redis sink URL may carry.
OPTIONS = frozenset(
    {
        "stream",
        "maxlen",
        "wait",
        "wait_timeout",
        "fields",
        "shards",
        "inflight",
        "ca",
        "cert",
        "key",
    }
)

#: Stream entry fields beyond the line itself.
EXTRA_FIELDS = ("peer", "time", "conn")


@dataclass(frozen=True)
class RedisConfig:
    """
    Where and how a Redis sink writes.

    @ivar nodes: one (host, port) for a single node; the seeds of a cluster.
    @ivar shards: how many stream keys (C{KEY:{0}}..) a cluster sink
        spreads lines over; 0 for a single node (one key, C{stream}).
    @ivar fields: extra fields in each entry, beside C{line}.
    """

    nodes: tuple[tuple[str, int], ...]
    tls: bool = False
    cluster: bool = False
    username: str | None = None
    password: str | None = None
    db: int = 0
    stream: str = "lines"
    maxlen: int | None = None
    wait: int = 0
    wait_timeout: int = 1000
    fields: tuple[str, ...] = ()
    shards: int = 0
    inflight: int = 4
    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def keys(self) -> list[str]:
        """
        @return: every stream key this sink writes to.
        """
        if not self.cluster:
            return [self.stream]
        return [shard_key(self.stream, index) for index in range(self.shards)]

    def key_for(self, origin: str | None, fallback: int) -> str:
        """
        @return: the key for a line of connection C{origin} (a cluster
            spreads connections over its shards by a hash of it; a line
            without an origin goes to shard C{fallback % shards}).
        """
        if not self.cluster:
            return self.stream
        if origin is None:
            return shard_key(self.stream, fallback % self.shards)
        return shard_key(self.stream, zlib.crc32(origin.encode()) % self.shards)

    def describe(self) -> str:
        """
        @return: the URL without its password, for logs.
        """
        scheme = ("rediss" if self.tls else "redis") + (
            "+cluster" if self.cluster else ""
        )
        hosts = ",".join(f"{host}:{port}" for host, port in self.nodes)
        user = f"{self.username or ''}:***@" if self.password else ""
        return f"{scheme}://{user}{hosts}/{self.db}?stream={self.stream}"


def shard_key(stream: str, index: int) -> str:
    """
    @return: C{stream:{index}}: the braces are a Redis hash tag, so shard
        keys hash on their index and fall on different slots.
    """
    return f"{stream}:{{{index}}}"


def _positive(url: SinkURL, name: str, default: int, least: int = 1) -> int:
    text = url.options.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise SinkURLError(
            f"{url.scheme}: {name}={text!r} is not a whole number"
        ) from None
    if value < least:
        raise SinkURLError(
            f"{url.scheme}: {name} must be at least {least}, got {value}"
        )
    return value


def _host_port(text: str, scheme: str) -> tuple[str, int]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":")
    else:
        host, _, port_text = text.rpartition(":")
        if not host:
            host, port_text = text, ""
    if not host:
        raise SinkURLError(f"{scheme}: no host in {text!r}")
    if not port_text:
        return host, 6379
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise SinkURLError(f"{scheme}: {port_text!r} is not a port")
    return host, int(port_text)


def parse_redis_url(url: SinkURL) -> RedisConfig:
    """
    @raise SinkURLError: for a URL a user must fix, saying why.
    """
    scheme = url.scheme
    if scheme not in SCHEMES:
        raise SinkURLError(f"{scheme}: not a Redis scheme")
    cluster = scheme.endswith("+cluster")
    if not url.target.startswith("//"):
        raise SinkURLError(
            f"{scheme}: want {scheme}://HOST:PORT/..., got {url.target!r}"
        )
    authority, _, path = url.target[2:].partition("/")
    credentials, at, hosts = authority.rpartition("@")
    username: str | None = None
    password: str | None = None
    if at:
        user_text, colon, password_text = credentials.partition(":")
        if colon:
            username = unquote(user_text) or None
            password = unquote(password_text)
        else:
            password = unquote(user_text)
    nodes = tuple(_host_port(part, scheme) for part in hosts.split(",") if part)
    if not nodes:
        raise SinkURLError(f"{scheme}: no HOST:PORT")
    if len(nodes) > 1 and not cluster:
        raise SinkURLError(
            f"{scheme}: one HOST:PORT (several are for redis+cluster://)"
        )
    db = 0
    if path:
        if not path.isdigit():
            raise SinkURLError(f"{scheme}: database {path!r} is not a number")
        db = int(path)
        if cluster and db != 0:
            raise SinkURLError(f"{scheme}: a Redis Cluster has only database 0")
    stream = url.options.get("stream", "lines")
    if not stream:
        raise SinkURLError(f"{scheme}: stream= must name a key")
    fields = tuple(f for f in url.options.get("fields", "").split(",") if f)
    for name in fields:
        if name not in EXTRA_FIELDS:
            raise SinkURLError(
                f"{scheme}: unknown field {name!r} (known: {', '.join(EXTRA_FIELDS)})"
            )
    if "shards" in url.options and not cluster:
        raise SinkURLError(f"{scheme}: shards= is for redis+cluster://")
    maxlen = _positive(url, "maxlen", 0) or None
    files: dict[str, str | None] = {}
    for name in ("ca", "cert", "key"):
        file_path = url.options.get(name)
        if file_path is not None:
            if not scheme.startswith("rediss"):
                raise SinkURLError(f"{scheme}: {name}= is for rediss:// (TLS)")
            if not os.path.isfile(file_path):
                raise SinkURLError(f"{scheme}: {name}={file_path!r} is not a file")
        files[name] = file_path
    if (files["cert"] is None) != (files["key"] is None):
        raise SinkURLError(f"{scheme}: cert= and key= go together")
    return RedisConfig(
        nodes=nodes,
        tls=scheme.startswith("rediss"),
        cluster=cluster,
        username=username,
        password=password,
        db=db,
        stream=stream,
        maxlen=maxlen,
        wait=_positive(url, "wait", 0, least=0),
        wait_timeout=_positive(url, "wait_timeout", 1000),
        fields=fields,
        shards=_positive(url, "shards", 1) if cluster else 0,
        inflight=_positive(url, "inflight", 4),
        ca=files["ca"],
        cert=files["cert"],
        key=files["key"],
    )
