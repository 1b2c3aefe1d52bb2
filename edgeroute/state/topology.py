"""Where shared state lives: one Redis, a Redis Cluster, or a Sentinel-managed primary.

URLs (credentials, TLS options and the database work the same in each):
  redis://[user:pass@]host:port/db           rediss://...?ssl_ca_certs=/ca.pem (TLS)
  redis+cluster://host:port[,host:port...]   (or any redis:// URL with `state.cluster: true`)
  redis+sentinel://[user:pass@]host:port[,host:port...]/master-name[/db]
      ?sentinel_password=...                 (sentinels with their own password)
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qs, unquote

import hiredis

from edgeroute.state.resp import Endpoint, RespConnection, command, encode_args

Kind = Literal["standalone", "cluster", "sentinel"]
_SCHEMES: dict[str, tuple[Kind, bool]] = {
    "redis": ("standalone", False),
    "rediss": ("standalone", True),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
}


@dataclass(frozen=True, slots=True)
class StateTarget:
    kind: Kind
    nodes: tuple[tuple[str, int], ...]  # the server, cluster seed nodes, or the sentinels
    username: str | None = None
    password: str | None = None
    db: int = 0
    ssl_context: ssl.SSLContext | None = None
    master_name: str | None = None
    sentinel_password: str | None = None

    def endpoint(self, host: str, port: int) -> Endpoint:
        return Endpoint(
            host=host,
            port=port,
            username=self.username,
            password=self.password,
            db=self.db if self.kind != "cluster" else 0,
            ssl_context=self.ssl_context,
            server_hostname=host,
        )


def _ssl_context(query: dict[str, str]) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=query.get("ssl_ca_certs"))
    if query.get("ssl_certfile"):
        context.load_cert_chain(query["ssl_certfile"], query.get("ssl_keyfile"))
    if query.get("ssl_cert_reqs", "required") == "none":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif query.get("ssl_check_hostname", "true").lower() in ("false", "0", "no"):
        context.check_hostname = False
    return context


def _hosts(text: str, default_port: int) -> tuple[tuple[str, int], ...]:
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
    query = {key: values[-1] for key, values in parse_qs(query_text).items()}
    netloc, _, path = rest.partition("/")
    credentials, at, hosts_text = netloc.rpartition("@")
    if not at:
        credentials, hosts_text = "", netloc
    username: str | None = None
    password: str | None = None
    if credentials:
        user, has_password, secret = credentials.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if has_password else None
    nodes = _hosts(hosts_text, 26379 if kind == "sentinel" else 6379)
    segments = [segment for segment in path.split("/") if segment]
    master_name = None
    if kind == "sentinel":
        if not segments:
            raise ValueError("a redis+sentinel URL needs the master name: .../<master-name>[/db]")
        master_name = unquote(segments.pop(0))
    db = int(segments[0]) if segments else int(query.get("db", "0"))
    return StateTarget(
        kind=kind,
        nodes=nodes,
        username=username,
        password=password,
        db=db,
        ssl_context=_ssl_context(query) if tls else None,
        master_name=master_name,
        sentinel_password=query.get("sentinel_password"),
    )


async def resolve_master(target: StateTarget) -> Endpoint:
    """Ask the sentinels, in turn, where the primary of `target.master_name` is now."""
    assert target.master_name is not None
    last_error = "no sentinel answered"
    for host, port in target.nodes:
        sentinel = Endpoint(
            host,
            port,
            password=target.sentinel_password,
            ssl_context=target.ssl_context,
            server_hostname=host,
        )
        try:
            connection = await RespConnection.open(sentinel)
        except OSError as exc:
            last_error = f"sentinel {host}:{port}: {exc}"
            continue
        try:
            (reply,) = await connection.execute(
                [
                    command(
                        3, encode_args(["SENTINEL", "get-master-addr-by-name", target.master_name])
                    )
                ]
            )
        except (OSError, ConnectionError, asyncio.IncompleteReadError) as exc:
            last_error = f"sentinel {host}:{port}: {exc}"
            continue
        finally:
            connection.close()
        if isinstance(reply, list) and len(reply) == 2:
            return target.endpoint(reply[0].decode(), int(reply[1]))
        if isinstance(reply, hiredis.ReplyError):
            last_error = f"sentinel {host}:{port}: {reply}"
        else:
            last_error = f"sentinel {host}:{port} does not know {target.master_name!r}"
    raise ConnectionError(last_error)


async def require_primary(connection: RespConnection) -> None:
    """Sentinel may be a moment behind a failover: never write to a demoted primary."""
    (role,) = await connection.execute([command(1, encode_args(["ROLE"]))])
    if not (isinstance(role, list) and role and role[0] == b"master"):
        raise ConnectionError("the server sentinel named is not a primary (failover underway)")
