"""Where shared state lives: one Redis, a Redis Cluster, or a Sentinel-managed primary.

URLs (credentials, TLS options and the database work the same in each):
  redis://[user:pass@]host:port/db           rediss://...?ssl_ca_certs=/ca.pem (TLS)
  redis+cluster://host:port[,host:port...]   (or any redis:// URL with `state.cluster: true`)
  redis+sentinel://[user:pass@]host:port[,host:port...]/master-name[/db]
      ?sentinel_password=...                 (sentinels with their own password)

redis-py understands one host per URL and neither the cluster nor the sentinel form, so this
module only splits off the host list (and the master name); everything else — credentials,
database, the `ssl_*` options — goes through `redis.asyncio.connection.parse_url`, and the
result is the keyword arguments of redis-py's own `Connection`/`SSLConnection`.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qs, quote, unquote, urlencode

from redis.asyncio.connection import Connection, RedisSSLContext, SSLConnection, parse_url
from redis.exceptions import RedisError

Kind = Literal["standalone", "cluster", "sentinel"]
Address = tuple[str, int]
_SCHEMES: dict[str, tuple[Kind, bool]] = {
    "redis": ("standalone", False),
    "rediss": ("standalone", True),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
}
# The TLS options SSLConnection takes from a URL query (redis-py spells them the same).
_SSL_OPTIONS = (
    "ssl_keyfile",
    "ssl_certfile",
    "ssl_cert_reqs",
    "ssl_ca_certs",
    "ssl_ca_path",
    "ssl_check_hostname",
    "ssl_min_version",
    "ssl_ciphers",
    "ssl_password",
)
# Not connection options: consumed here, never passed to redis-py.
_OWN_OPTIONS = ("sentinel_password",)


@dataclass(frozen=True, slots=True)
class StateTarget:
    kind: Kind
    nodes: tuple[Address, ...]  # the server, cluster seed nodes, or the sentinels
    username: str | None = None
    password: str | None = None
    db: int = 0
    tls: dict[str, Any] | None = None  # SSLConnection's ssl_* keyword arguments
    master_name: str | None = None
    sentinel_password: str | None = None
    ssl_context: ssl.SSLContext | None = field(default=None, compare=False)

    def connection_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for redis-py's Connection/SSLConnection (all but host/port).

        RESP2, because the scripts' replies are decoded as RESP2 shapes (redis-py 8 would
        otherwise say HELLO 3, one more round trip per connect and other reply types).
        """
        kwargs: dict[str, Any] = {
            "connection_class": SSLConnection if self.tls is not None else Connection,
            "username": self.username,
            "password": self.password,
            "db": self.db if self.kind != "cluster" else 0,
            "protocol": 2,
        }
        if self.tls is not None:
            kwargs.update(self.tls)
        return kwargs

    def sentinel_kwargs(self) -> dict[str, Any]:
        """Sentinels share TLS with the data nodes, with their own (optional) password."""
        kwargs: dict[str, Any] = {"password": self.sentinel_password, "protocol": 2}
        if self.tls is not None:
            kwargs.update(self.tls, ssl=True)
        return kwargs


def _hosts(text: str, default_port: int) -> tuple[Address, ...]:
    hosts = []
    for item in filter(None, text.split(",")):
        if item.startswith("["):  # [::1]:6379
            host, _, rest = item[1:].partition("]")
            port = rest.lstrip(":")
        else:
            host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
        if not host:
            raise ValueError(f"bad host in redis URL: {item!r}")
        hosts.append((host, int(port) if port else default_port))
    if not hosts:
        raise ValueError("redis URL names no host")
    return tuple(hosts)


def parse_state_url(url: str, *, cluster: bool = False) -> StateTarget:
    """Parse a state URL; `cluster=True` treats a plain redis:// URL as a cluster seed."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in _SCHEMES:
        raise ValueError(
            f"unsupported redis URL scheme {scheme!r} (use redis, rediss, redis+cluster, "
            "redis+sentinel or their rediss+ forms)"
        )
    kind, tls = _SCHEMES[scheme]
    if cluster and kind == "standalone":
        kind = "cluster"
    rest, _, query_text = rest.partition("?")
    netloc, _, path = rest.partition("/")
    credentials, at, hosts_text = netloc.rpartition("@")
    if not at:
        credentials, hosts_text = "", netloc
    nodes = _hosts(hosts_text, 26379 if kind == "sentinel" else 6379)
    segments = [segment for segment in path.split("/") if segment]
    master_name = None
    if kind == "sentinel":
        if not segments:
            raise ValueError("a redis+sentinel URL needs the master name: .../<master-name>[/db]")
        master_name = unquote(segments.pop(0))
    query = {key: values[-1] for key, values in parse_qs(query_text).items()}
    own = {key: query.pop(key) for key in _OWN_OPTIONS if key in query}
    # What is left is one ordinary redis:// URL: let redis-py read credentials, db and TLS.
    single = f"{'rediss' if tls else 'redis'}://{credentials}{at}{quote('x')}/"
    single += "/".join(segments[:1]) + ("?" + urlencode(query) if query else "")
    parsed: dict[str, Any] = dict(parse_url(single))
    tls_options = {key: parsed[key] for key in _SSL_OPTIONS if key in parsed} if tls else None
    return StateTarget(
        kind=kind,
        nodes=nodes,
        username=parsed.get("username"),
        password=parsed.get("password"),
        db=int(parsed.get("db", 0)),
        tls=tls_options,
        master_name=master_name,
        sentinel_password=own.get("sentinel_password"),
        # Built now so that a bad CA or key file is a configuration error at start, not a
        # failed connection later; redis-py builds the context each connection uses.
        ssl_context=_context(tls_options) if tls_options is not None else None,
    )


def _context(options: dict[str, Any]) -> ssl.SSLContext:
    try:
        return _redis_ssl_context(options)
    except RedisError as exc:  # e.g. an unknown ssl_cert_reqs: a bad URL, said as such
        raise ValueError(f"bad TLS option in redis URL: {exc}") from None


def _redis_ssl_context(options: dict[str, Any]) -> ssl.SSLContext:
    return RedisSSLContext(
        keyfile=options.get("ssl_keyfile"),
        certfile=options.get("ssl_certfile"),
        cert_reqs=options.get("ssl_cert_reqs", "required"),
        ca_certs=options.get("ssl_ca_certs"),
        ca_path=options.get("ssl_ca_path"),
        check_hostname=options.get("ssl_check_hostname", True),
        min_version=options.get("ssl_min_version"),
        ciphers=options.get("ssl_ciphers"),
        password=options.get("ssl_password"),
    ).get()
