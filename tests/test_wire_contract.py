"""The Lua wire contract is written once (edgeroute/state/wire.py); the scripts' header
comments must say the same, and the codes Lua declares must be the ones Python sends."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from redis.crc import key_slot

from edgeroute.state import wire
from edgeroute.state.base import RouteSpec
from edgeroute.state.redis import client_keys, outcome_args, route_params
from edgeroute.strategy import STRATEGY_KINDS, RoutingStrategy
from edgeroute.types import Outcome, OutcomeKind, TargetSpec

LUA = Path(__file__).resolve().parent.parent / "lua"


def _header_names(text: str, label: str) -> list[str]:
    """The names after `-- LABEL:` and its indented continuation lines, up to a blank one."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(f"-- {label}:"):
            words = line.split(":", 1)[1].split()
            for more in lines[i + 1 :]:
                if not more.startswith("--        ") and not more.startswith("--         "):
                    break
                words += more[2:].split()
            return words
    raise AssertionError(f"no `-- {label}:` line")


def test_lib_declares_the_route_parameters_in_wire_order() -> None:
    lib = (LUA / "lib.lua").read_text()
    assert _header_names(lib, "PARAMS") == list(wire.ROUTE_PARAMS)
    # ...and reads exactly that many (ARG0) before each script's own fields.
    assert f"local ARG0 = {len(wire.ROUTE_PARAMS)}" in lib


@pytest.mark.parametrize("script", sorted(wire.SCRIPT_ARGS))
def test_each_script_header_lists_the_wire_fields(script: str) -> None:
    text = (LUA / f"{script}.lua").read_text()
    assert " ".join(_header_names(text, "ARGV")) == " ".join(wire.SCRIPT_ARGS[script])
    assert " ".join(_header_names(text, "REPLY")) == " ".join(wire.SCRIPT_REPLIES[script])


@pytest.mark.parametrize("name", ["team", "a}b{c", "{x}", "t:client:u"])
def test_client_script_keys_are_the_wire_ones_in_one_slot(name: str) -> None:
    text = (LUA / "client.lua").read_text()
    assert _header_names(text, "KEYS") == list(wire.CLIENT_KEYS)
    keys = client_keys("p", name)
    assert len(keys) == len(wire.CLIENT_KEYS)
    # One slot whatever the client's name holds: the script stays one cluster call.
    assert len({key_slot(key.encode()) for key in keys}) == 1


def test_decide_header_spells_out_both_row_kinds() -> None:
    comments = [
        line[2:] for line in (LUA / "decide.lua").read_text().splitlines() if line[:2] == "--"
    ]
    text = re.sub(r"\s+", " ", " ".join(comments))
    assert "request: " + " ".join(wire.DECIDE_REQUEST) + " " in text
    assert "reply (one per request, in order): " + " ".join(wire.DECIDE_REPLY) + " " in text
    assert "candidate (best first, `count` of them): " + " ".join(wire.CANDIDATE_ROW) in text
    assert "target (explain only, configuration order): " + " ".join(wire.TARGET_ROW) in text


def test_outcome_fields_match_lib_and_python_packing() -> None:
    lib = (LUA / "lib.lua").read_text()
    assert f"local OUTCOME_FIELDS = {len(wire.OUTCOME_FIELDS)}" in lib
    assert _header_names(lib.replace("--   target_id", "-- OUTCOME: target_id"), "OUTCOME") == [
        *wire.OUTCOME_FIELDS
    ]
    outcome = Outcome("t", OutcomeKind.FAILURE, 1.5, 3, "tok", True, 2.0, 7, 9, 5, 1000, 3.0)
    assert len(outcome_args(outcome)) == len(wire.OUTCOME_FIELDS)


def test_codes_are_the_ones_lua_declares() -> None:
    lib = (LUA / "lib.lua").read_text()
    decide = (LUA / "decide.lua").read_text()
    states = re.search(r"local CLOSED, OPEN, HALF_OPEN = (\d), (\d), (\d)", lib)
    assert states is not None
    assert [wire.STATE_CODES[int(code)].name for code in states.groups()] == [
        "CLOSED",
        "OPEN",
        "HALF_OPEN",
    ]
    kinds = re.search(
        r"local SUCCESS, FAILURE, RATE_LIMITED, NEUTRAL = (\d), (\d), (\d), (\d)", lib
    )
    assert kinds is not None
    assert [int(code) for code in kinds.groups()] == [
        wire.outcome_kind_codes()[name]
        for name in ("SUCCESS", "FAILURE", "RATE_LIMITED", "NEUTRAL")
    ]
    strategies = re.search(
        r"local COST, LATENCY, HYBRID, ROUND_ROBIN, LEAST_BUSY, PRIORITY, WEIGHTED = "
        r"(\d), (\d), (\d), (\d), (\d), (\d), (\d)",
        decide,
    )
    assert strategies is not None
    assert [int(code) for code in strategies.groups()] == [
        wire.STRATEGY_CODES[kind]
        for kind in (
            "cost",
            "latency",
            "hybrid",
            "round_robin",
            "least_busy",
            "priority",
            "weighted",
        )
    ]
    assert set(wire.STRATEGY_CODES) == set(STRATEGY_KINDS)
    reasons = re.search(
        r"local BREAKER_OPEN, RATE_LIMITED_OUT, PROBES_FULL = (\d), (\d), (\d)", decide
    )
    assert reasons is not None
    assert [wire.EXCLUSION_REASONS[int(code)] for code in reasons.groups()] == [
        "breaker_open",
        "rate_limited",
        "probes_full",
    ]
    assert wire.EXCLUSION_REASONS[0] is None
    quotas = re.search(r"local QUOTA_CONCURRENCY, QUOTA_RPM, QUOTA_TPM = (\d), (\d), (\d)", lib)
    learned = re.search(r"local LEARNED_LIMIT = (\d)", decide)
    assert quotas is not None and learned is not None
    assert [wire.EXCLUSION_REASONS[int(code)] for code in (*quotas.groups(), learned[1])] == [
        "quota_concurrency",
        "quota_rpm",
        "quota_tpm",
        "learned_limit",
    ]
    assert set(wire.QUOTA_REASONS) == set(wire.EXCLUSION_REASONS[4:])
    pins = re.search(r"local PIN_NEW, PIN_KEPT, PIN_MOVED = (\d), (\d), (\d)", decide)
    assert pins is not None
    assert [wire.AFFINITY_STATES[int(code)] for code in pins.groups()] == ["new", "kept", "moved"]


def test_route_params_pack_every_field_in_order() -> None:
    route = RouteSpec("r", RoutingStrategy.default_hybrid(), (TargetSpec("a", "p", "m"),))
    params = route_params(route)
    assert len(params) == len(wire.ROUTE_PARAMS)
    named = dict(zip(wire.ROUTE_PARAMS, params, strict=True))
    # Every expiry is computed once, on the RouteSpec, and sent by name.
    assert named["key_ttl_ms"] == route.key_ttl_ms
    assert named["max_cooldown_ms"] == route.max_cooldown_ms


def test_no_script_hard_codes_an_expiry() -> None:
    for path in LUA.glob("*.lua"):
        for line in path.read_text().splitlines():
            if "PEXPIRE" in line:
                assert re.search(r"PEXPIRE', K_\w+, P\.\w+\)", line), f"{path.name}: {line}"
