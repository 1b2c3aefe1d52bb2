"""lua/client.lua's own keys on a real Redis (fakeredis as an extra): the lease set, repairs of
lost and mistyped keys, TTLs, and a rolling upgrade from the previous format (whose script is
kept in tests/support/legacy/client_v1.lua). Semantics shared with the reference model are
tested over every backend in tests/test_clients.py."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from redis.asyncio import Redis

from edgeroute.clients import ClientLease, Clients, ClientSpec, Verdict
from edgeroute.state import wire
from edgeroute.state.redis import RedisState, client_keys
from tests.support.backends import VirtualClock, redis_url_for, table

START = 1_801_000_000.0
LEASE_TTL_MS = 60_000
LEGACY = Path(__file__).resolve().parent / "support" / "legacy" / "client_v1.lua"


@dataclass
class Setup:
    clients: Clients
    clock: VirtualClock
    raw: Redis
    prefix: str

    def keys(self, client: ClientSpec) -> tuple[str, str]:
        return client_keys(self.prefix, client.name)

    async def old_replica(
        self,
        client: ClientSpec,
        op: str,
        token: str,
        *,
        tokens: int = 0,
        reserved: int = 0,
        reserved_at: int = 0,
        used: int = 0,
        cost: int = 0,
    ) -> Verdict:
        """One call of the previous client.lua (one key, the same ARGV and REPLY)."""
        args: list[str | int] = [
            wire.CLIENT_OPS[op],
            client.rpm,
            client.tpm,
            client.max_concurrency,
            client.budget_micro,
            wire.CLIENT_PERIODS[client.period],
            token,
            tokens,
            reserved,
            reserved_at,
            used,
            cost,
            LEASE_TTL_MS,
            self.clients.key_ttl_ms,
            int(self.clock() * 1000),
        ]
        reply = await self.raw.eval(LEGACY.read_text(), 1, self.keys(client)[0], *args)
        return Verdict(reply[0] == 1, wire.CLIENT_REASONS[reply[1]], *reply[2:])

    async def ttls(self, client: ClientSpec) -> list[int]:
        return [int(await self.raw.pttl(key)) for key in self.keys(client)]


@pytest.fixture(params=table(("fakeredis", "redis")))
async def setup(request: pytest.FixtureRequest) -> AsyncIterator[Setup]:
    clock = VirtualClock(START)
    url = redis_url_for(request.param, request)
    prefix = f"cs-{uuid.uuid4().hex[:10]}"
    state = RedisState(url, key_prefix=prefix, timeout_ms=2000, clock=clock)
    raw = Redis.from_url(url)
    yield Setup(Clients(state, lease_ttl_ms=LEASE_TTL_MS, clock=clock), clock, raw, prefix)
    await raw.aclose()
    await state.close()


def spec(**limits: object) -> ClientSpec:
    return ClientSpec(name=f"team-{uuid.uuid4().hex[:6]}", digest=b"", **limits)  # type: ignore[arg-type]


async def admit(s: Setup, client: ClientSpec, tokens: int = 0) -> ClientLease:
    verdict, lease = await s.clients.admit(client, tokens)
    assert verdict.admitted and lease is not None, verdict
    return lease


def counts(verdict: Verdict) -> tuple[int, int, int, int]:
    return verdict.requests, verdict.tokens, verdict.inflight, verdict.spent_micro


def assert_live_ttls(ttls: Sequence[int], key_ttl_ms: int) -> None:
    assert all(0 < ttl <= key_ttl_ms for ttl in ttls), ttls


async def test_leases_are_a_sorted_set_and_expired_ones_leave_it(setup: Setup) -> None:
    client = spec(max_concurrency=10)
    leases = [await admit(setup, client) for _ in range(3)]
    _, leases_key = setup.keys(client)
    members = await setup.raw.zrange(leases_key, 0, -1, withscores=True)
    expiry = int(setup.clock() * 1000) + LEASE_TTL_MS
    assert sorted(members) == sorted((lease.token.encode(), expiry) for lease in leases)
    await setup.clients.settle(leases[0], 0, 0.0)
    assert await setup.raw.zcard(leases_key) == 2
    setup.clock.advance(LEASE_TTL_MS)  # the other two were never settled: their replica died
    assert (await setup.clients.read(client)).inflight == 0
    assert await setup.raw.zcard(leases_key) == 2  # a read writes nothing
    setup.clock.advance(1)
    fresh = await admit(setup, client)
    assert await setup.raw.zrange(leases_key, 0, -1) == [fresh.token.encode()]


async def test_a_lost_key_counts_afresh_and_a_late_settle_of_it_is_harmless(
    setup: Setup,
) -> None:
    client = spec(max_concurrency=2, tpm=1000, rpm=5, budget_micro=1_000_000)
    first = await admit(setup, client, 400)
    await admit(setup, client, 400)
    await setup.raw.delete(*setup.keys(client))  # evicted, flushed, failed over without it
    assert counts(await setup.clients.read(client)) == (0, 0, 0, 0)
    await setup.clients.settle(first, 100, 0.5)  # less than reserved: nothing to give back
    assert counts(await setup.clients.read(client)) == (0, 0, 0, 500_000)
    lease = await admit(setup, client, 900)
    assert counts(await setup.clients.read(client)) == (1, 900, 1, 500_000)
    assert_live_ttls(await setup.ttls(client), setup.clients.key_ttl_ms)
    await setup.clients.settle(lease, 950, 0.0)
    assert (await setup.clients.read(client)).tokens == 950


@pytest.mark.parametrize("op", ["admit", "settle", "read"])
async def test_keys_of_the_wrong_type_are_replaced(setup: Setup, op: str) -> None:
    client = spec(max_concurrency=2, tpm=1000)
    lease = await admit(setup, client, 10)
    hash_key, leases_key = setup.keys(client)
    await setup.raw.delete(hash_key, leases_key)
    await setup.raw.set(hash_key, "tampered")
    await setup.raw.rpush(leases_key, "tampered")
    if op == "admit":
        await admit(setup, client, 10)
    elif op == "settle":
        await setup.clients.settle(lease, 10, 0.1)
    seen = await setup.clients.read(client)
    assert seen.inflight == (1 if op == "admit" else 0)
    # Replaced (a read deletes them and writes nothing; a settle leaves no lease behind).
    expected = {"admit": (b"hash", b"zset"), "settle": (b"hash", b"none"), "read": (b"none",) * 2}
    assert (await setup.raw.type(hash_key), await setup.raw.type(leases_key)) == expected[op]
    await admit(setup, client, 10)
    assert (await setup.raw.type(hash_key), await setup.raw.type(leases_key)) == (b"hash", b"zset")


async def test_an_unreadable_window_counts_afresh(setup: Setup) -> None:
    client = spec(rpm=2)
    await admit(setup, client)
    await admit(setup, client)
    await setup.raw.hset(setup.keys(client)[0], "w", "not a window")
    assert (await setup.clients.read(client)).requests == 0
    await admit(setup, client)


async def test_every_key_has_a_ttl_after_every_call(setup: Setup) -> None:
    key_ttl = setup.clients.key_ttl_ms
    client = spec(max_concurrency=5, rpm=100)
    lease = await admit(setup, client)
    assert_live_ttls(await setup.ttls(client), key_ttl)
    setup.clock.advance(500)
    await admit(setup, client)  # same second: the TTLs are renewed once a second
    await setup.clients.settle(lease, 0, 0.1)
    assert_live_ttls(await setup.ttls(client), key_ttl)
    # A settle whose keys are gone creates the hash: with a TTL too.
    await setup.raw.delete(*setup.keys(client))
    await setup.clients.settle(lease, 0, 0.1)
    hash_ttl, leases_ttl = await setup.ttls(client)
    assert 0 < hash_ttl <= key_ttl and leases_ttl == -2  # no lease: no set


# ---- a rolling upgrade: replicas on the previous client.lua beside this one --------------


async def test_the_previous_format_is_migrated_counts_and_leases_kept(setup: Setup) -> None:
    """Keys written by the old script ('q' and 'l' in the hash) are read by the new one as
    they stand, then moved into its fields and its lease set on its first write."""
    client = spec(rpm=10, tpm=10_000, max_concurrency=4)
    old = [f"old-{i}" for i in range(3)]
    await setup.old_replica(client, "admit", old[0], tokens=500)
    setup.clock.advance(2_000)
    await setup.old_replica(client, "admit", old[1], tokens=700)
    await setup.old_replica(client, "admit", old[2], tokens=300)
    now_ms = int(setup.clock() * 1000)
    before = await setup.old_replica(
        client, "settle", old[1], reserved=700, reserved_at=now_ms, used=100
    )
    hash_key, leases_key = setup.keys(client)
    seen = await setup.clients.read(client)
    assert counts(seen) == counts(before) == (3, 900, 2, 0)
    assert seen.reset_requests_ms == before.reset_requests_ms
    assert set(await setup.raw.hkeys(hash_key)) >= {b"q", b"l"}  # a read writes nothing

    lease = await admit(setup, client, 1_000)
    assert counts(await setup.clients.read(client)) == (4, 1_900, 3, 0)
    assert not {b"q", b"l"} & set(await setup.raw.hkeys(hash_key))
    assert sorted(await setup.raw.zrange(leases_key, 0, -1)) == sorted(
        t.encode() for t in (old[0], old[2], lease.token)
    )
    assert_live_ttls(await setup.ttls(client), setup.clients.key_ttl_ms)
    # An old lease settled by the new script (its token is all the new one needs).
    await setup.clients.settle(ClientLease(client, old[2], 300, lease.reserved_at_ms), 300, 0.0)
    assert (await setup.clients.read(client)).inflight == 2
    # The old leases expire when they always would have.
    setup.clock.advance(LEASE_TTL_MS - 2_000)
    assert (await setup.clients.read(client)).inflight == 1
    # And the old minute ages out bucket by bucket.
    setup.clock.advance(1_000)
    assert (await setup.clients.read(client)).requests == 3


async def test_an_old_replica_beside_new_ones_never_misreads_the_new_fields(
    setup: Setup,
) -> None:
    client = spec(rpm=10, tpm=10_000, max_concurrency=4)
    await admit(setup, client, 400)
    await admit(setup, client, 400)
    # The old script sees neither 'w' nor the lease set: only what old replicas counted.
    old = await setup.old_replica(client, "admit", "old-1", tokens=100)
    assert old.admitted and counts(old) == (1, 100, 1, 0)
    seen = await setup.clients.read(client)
    assert counts(seen) == (3, 900, 3, 0)
    await admit(setup, client, 100)  # migrates old-1 into the lease set
    # The old replica settles old-1 after its migration: it stays counted until it expires
    # (too many in flight for at most a lease TTL, never too few).
    await setup.old_replica(
        client, "settle", "old-1", reserved=100, reserved_at=old.now_ms, used=100, cost=250_000
    )
    seen = await setup.clients.read(client)
    assert (seen.requests, seen.inflight, seen.spent_micro) == (4, 4, 250_000)
    setup.clock.advance(LEASE_TTL_MS)
    assert (await setup.clients.read(client)).inflight == 0
