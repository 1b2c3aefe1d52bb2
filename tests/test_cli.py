"""The `edgeroute` command line: exit codes, one-line errors, masked secrets, explain/state."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from edgeroute import cli
from edgeroute.cli import Redactor, build_parser, main, mask_url_credentials
from edgeroute.config import load_config
from edgeroute.mock_provider import MockSettings
from edgeroute.router import Router
from edgeroute.state import MemoryState
from edgeroute.types import OutcomeKind

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "examples"
QUICKSTART = EXAMPLES / "quickstart.yaml"
FULL_EXAMPLE = EXAMPLES / "edgeroute.yaml"

# Everything examples/edgeroute.yaml requires from the environment.
FULL_EXAMPLE_ENV = {
    "OPENAI_API_KEY": "sk-openai-secret-1234",
    "ANTHROPIC_API_KEY": "sk-ant-secret-5678",
    "AZURE_OPENAI_API_KEY": "azure-secret-9012",
    "AZURE_OPENAI_ENDPOINT": "https://my-resource.openai.azure.com",
    "EDGEROUTE_ADMIN_TOKEN": "admin-token-secret",
    "EDGEROUTE_CLIENT_KEY": "client-key-secret",
}

MEMORY_CONFIG = """\
providers:
  - {name: fast, base_url: "http://127.0.0.1:9101/v1", api_key: "sk-fast-secret-key"}
  - {name: cheap, base_url: "http://127.0.0.1:9102/v1"}
routes:
  - model: chat
    strategy: hybrid
    targets:
      - {provider: fast, model: gpt-4o, input_cost_per_mtok: 2.5, output_cost_per_mtok: 10}
      - {provider: cheap, model: gpt-4o-mini, input_cost_per_mtok: 0.15, output_cost_per_mtok: 0.6}
  - model: chat-rr
    strategy: round_robin
    targets:
      - {provider: fast, model: gpt-4o-mini}
      - {provider: cheap, model: gpt-4o-mini}
"""

ONE_ROUTE = """\
providers: [{name: p, base_url: "http://127.0.0.1:9101/v1"}]
routes: [{model: r, targets: [{provider: p, model: m}]}]
"""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ambient Redis URL or debug flag leaks into these tests."""
    monkeypatch.delenv("EDGEROUTE_REDIS_URL", raising=False)
    monkeypatch.delenv("EDGEROUTE_DEBUG", raising=False)


def write(tmp_path: Path, text: str, name: str = "edgeroute.yaml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert err.endswith("\n")
    return lines[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def edgeroute_command() -> list[str]:
    """The installed console script if there is one, else `python -m edgeroute.cli`."""
    for candidate in (shutil.which("edgeroute"), str(Path(sys.executable).parent / "edgeroute")):
        if candidate and os.access(candidate, os.X_OK):
            return [candidate]
    return [sys.executable, "-m", "edgeroute.cli"]


def subprocess_env(**extra: str) -> dict[str, str]:
    skip = ("EDGEROUTE_REDIS_URL", "EDGEROUTE_DEBUG")
    env = {k: v for k, v in os.environ.items() if k not in skip}
    env.update(extra)
    return env


# --- check ---------------------------------------------------------------------------------


def test_check_quickstart(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "check", "--config", str(QUICKSTART))
    assert (code, err) == (0, "")
    assert out == "config OK: 2 providers, 2 routes (state: memory)\n"


def test_quickstart_has_the_promised_shape() -> None:
    config = load_config(QUICKSTART, env={})
    assert config.state.redis_url is None
    assert {p.name: p.base_url for p in config.providers} == {
        "mock-fast": "http://127.0.0.1:9101/v1",
        "mock-cheap": "http://127.0.0.1:9102/v1",
    }
    assert all(p.api_key is None for p in config.providers)
    assert config.route("chat").strategy == "hybrid"
    assert {t.provider for t in config.route("chat").targets} == {"mock-fast", "mock-cheap"}
    assert config.route("chat-rr").strategy == "round_robin"


def test_check_full_example(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in FULL_EXAMPLE_ENV.items():
        monkeypatch.setenv(name, value)
    code, out, err = run(capsys, "check", "-c", str(FULL_EXAMPLE))
    assert (code, err) == (0, "")
    assert out == "config OK: 4 providers, 6 routes (state: redis redis://127.0.0.1:6379/0)\n"
    for secret in FULL_EXAMPLE_ENV.values():
        if "secret" in secret:
            assert secret not in out


def test_full_example_covers_every_kind_and_strategy() -> None:
    config = load_config(FULL_EXAMPLE, env=FULL_EXAMPLE_ENV)
    assert {p.kind for p in config.providers} == {"openai", "anthropic", "azure"}
    assert {r.strategy for r in config.routes} == {
        "cost",
        "latency",
        "hybrid",
        "round_robin",
        "least_busy",
    }
    assert config.provider("openai").api_key == FULL_EXAMPLE_ENV["OPENAI_API_KEY"]
    assert config.provider("vllm").api_key == "EMPTY"  # the `:-` default


def test_check_full_example_without_env_names_the_missing_variable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in FULL_EXAMPLE_ENV:
        monkeypatch.delenv(name, raising=False)
    code, out, err = run(capsys, "check", "-c", str(FULL_EXAMPLE))
    assert (code, out) == (2, "")
    # All six variables in one run, one line each, in the file's order.
    assert err.splitlines() == [
        "edgeroute: $.server.admin_token: environment variable EDGEROUTE_ADMIN_TOKEN is not set",
        "edgeroute: $.server.api_keys[0]: environment variable EDGEROUTE_CLIENT_KEY is not set",
        "edgeroute: $.providers[0].api_key (provider openai): "
        "environment variable OPENAI_API_KEY is not set",
        "edgeroute: $.providers[1].api_key (provider anthropic): "
        "environment variable ANTHROPIC_API_KEY is not set",
        "edgeroute: $.providers[2].base_url (provider azure-eastus): "
        "environment variable AZURE_OPENAI_ENDPOINT is not set",
        "edgeroute: $.providers[2].api_key (provider azure-eastus): "
        "environment variable AZURE_OPENAI_API_KEY is not set",
    ]


def test_check_pluralises(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(
        tmp_path,
        "providers: [{name: p, base_url: 'http://x'}]\n"
        "routes: [{model: r, targets: [{provider: p, model: m}]}]\n",
    )
    assert run(capsys, "check", "-c", path) == (
        0,
        "config OK: 1 provider, 1 route (state: memory)\n",
        "",
    )


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("server: {port: 70000}\n", "$.server.port"),
        ("bogus: 1\n", "$: "),
        ("providers: [{name: 'a|b', base_url: 'http://x'}]\n", "$.providers[0].name"),
        (
            "routes: [{model: r, targets: [{provider: ghost, model: m}]}]\n",
            "$.routes[0].targets[0].provider",
        ),
        ("server:\n  port: [1,\n", "$: invalid YAML at "),
    ],
)
def test_check_bad_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, path: str
) -> None:
    code, out, err = run(capsys, "check", "--config", write(tmp_path, text))
    assert (code, out) == (2, "")
    assert one_line(err).startswith(f"edgeroute: {path}")


def test_check_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "check", "--config", str(tmp_path / "nope.yaml"))
    assert (code, out) == (2, "")
    line = one_line(err)
    assert line.startswith("edgeroute: $: cannot read ")
    assert "nope.yaml" in line


def test_check_unreadable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A directory is unreadable as a file for everyone, root included.
    code, out, err = run(capsys, "check", "--config", str(tmp_path))
    assert (code, out) == (2, "")
    assert one_line(err).startswith("edgeroute: $: cannot read ")


def test_check_bad_redis_url_scheme(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "state: {redis_url: 'memcached://u:hunter22@h:1'}\n" + ONE_ROUTE)
    code, out, err = run(capsys, "check", "-c", path)
    assert (code, out) == (2, "")
    line = one_line(err)
    assert line.startswith("edgeroute: $.state.redis_url: ")
    assert line.count("$.state.redis_url") == 1, line
    assert "hunter22" not in line


def test_check_bad_redis_url_from_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEROUTE_REDIS_URL", "http://h:1")
    code, out, err = run(capsys, "check", "-c", write(tmp_path, ONE_ROUTE))
    assert (code, out) == (2, "")
    line = one_line(err)
    assert line.startswith("edgeroute: $.state.redis_url (from EDGEROUTE_REDIS_URL): ")
    assert line.count("$.state.redis_url") == 1, line


def test_check_refuses_a_config_without_routes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "check", "-c", write(tmp_path, "{}\n"))
    assert (code, out) == (2, "")
    assert one_line(err).startswith("edgeroute: $.routes: no routes configured")


def test_check_reports_every_problem_with_suggestions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = """\
server: {port: "8080"}
breaker: {failure_treshold: 2}
providers:
  - {name: openai, kind: openia, base_url: "https://api.openai.com/v1"}
routes:
  - model: chat
    strategy: cheapest
    targets: [{provider: opneai, model: gpt-4o-mini}]
"""
    code, out, err = run(capsys, "check", "-c", write(tmp_path, text))
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        "edgeroute: $.server.port: Expected `int`, got `str`",
        "edgeroute: $.breaker: unknown field `failure_treshold`; did you mean `failure_threshold`?",
        "edgeroute: $.providers[0].kind (provider openai): unknown value 'openia'; "
        "expected one of: openai, azure, anthropic; did you mean `openai`?",
        "edgeroute: $.routes[0].strategy (route chat): unknown value 'cheapest'; "
        "expected one of: cost, latency, hybrid, round_robin, least_busy, priority, weighted",
        "edgeroute: $.routes[0].targets[0].provider (route chat): unknown provider 'opneai'; "
        "known providers: openai; did you mean `openai`?",
    ]


# --- secrets -------------------------------------------------------------------------------


def test_check_masks_the_redis_password(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(
        tmp_path,
        "state: {redis_url: 'redis://admin:hunter22@redis.internal:6379/0'}\n" + ONE_ROUTE,
    )
    code, out, err = run(capsys, "check", "-c", path)
    assert (code, err) == (0, "")
    assert (
        out
        == "config OK: 1 provider, 1 route (state: redis redis://admin:***@redis.internal:6379/0)\n"
    )
    assert "hunter22" not in out


def test_check_masks_the_env_redis_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEROUTE_REDIS_URL", "rediss://:topsecretpw@cache.example:6380/1")
    code, out, err = run(capsys, "check", "-c", str(QUICKSTART))
    assert (code, err) == (0, "")
    assert "redis rediss://:***@cache.example:6380/1" in out
    assert "topsecretpw" not in out


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("redis://user:pass@host:6379/0", "redis://user:***@host:6379/0"),
        ("redis://:pass@host", "redis://:***@host"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("redis://user@host", "redis://user@host"),
        ("x redis://a:b@h and rediss://c:d@i y", "x redis://a:***@h and rediss://c:***@i y"),
        ("redis://h/0?password=s3cret&db=1", "redis://h/0?password=***&db=1"),
    ],
)
def test_mask_url_credentials(text: str, masked: str) -> None:
    assert mask_url_credentials(text) == masked


def test_redactor_masks_config_secrets(tmp_path: Path) -> None:
    path = write(tmp_path, MEMORY_CONFIG)
    redact = Redactor()
    redact.add_config(load_config(path, env={}))
    assert redact("key sk-fast-secret-key leaked") == "key *** leaked"
    redact.add("abc")  # too short to mask meaningfully
    assert redact("abc") == "abc"


def test_unexpected_error_is_one_line_and_redacted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("kaput\nsk-fast-secret-key via redis://u:pw12345@h")

    monkeypatch.setattr(cli, "Router", boom)
    code, out, err = run(capsys, "check", "-c", write(tmp_path, MEMORY_CONFIG))
    assert (code, out) == (1, "")
    line = one_line(err)
    assert line == "edgeroute: RuntimeError: kaput *** via redis://u:***@h"


def test_debug_shows_a_redacted_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("kaput sk-fast-secret-key")

    monkeypatch.setattr(cli, "Router", boom)
    monkeypatch.setenv("EDGEROUTE_DEBUG", "1")
    code, _, err = run(capsys, "check", "-c", write(tmp_path, MEMORY_CONFIG))
    assert code == 1
    assert "Traceback (most recent call last)" in err
    assert err.rstrip().splitlines()[-1] == "edgeroute: RuntimeError: kaput ***"
    assert "sk-fast-secret-key" not in err


def test_exception_without_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise LookupError

    monkeypatch.setattr(cli, "Router", boom)
    code, _, err = run(capsys, "check", "-c", write(tmp_path, MEMORY_CONFIG))
    assert (code, one_line(err)) == (1, "edgeroute: LookupError")


# --- explain -------------------------------------------------------------------------------


def test_explain_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        capsys, "explain", "--config", write(tmp_path, MEMORY_CONFIG), "chat", "--json"
    )
    assert code == 0
    assert "in-memory" in one_line(err)  # a note, on stderr, so stdout stays pure JSON
    doc = json.loads(out)
    assert doc["route"] == "chat"
    assert doc["strategy"] == "hybrid"
    assert sum(doc["weights"].values()) == pytest.approx(1.0)
    # Nothing measured yet: the cheaper target wins on cost alone.
    assert doc["order"] == ["cheap:gpt-4o-mini", "fast:gpt-4o"]
    assert doc["reason"].startswith("hybrid: cheap:gpt-4o-mini")
    targets = {t["target"]: t for t in doc["targets"]}
    assert targets["cheap:gpt-4o-mini"]["rank"] == 1
    assert targets["fast:gpt-4o"]["rank"] == 2
    for target in targets.values():
        assert target["breaker"] == "closed"
        assert target["admissible"] is True
        assert target["excluded"] is None and target["excluded_because"] is None
        assert 0.0 <= target["score"] <= 1.0
        assert target["window"]["latency_ms"] is None
        assert target["window"]["success_rate"] is None
        assert target["in_flight"] == 0
    assert targets["cheap:gpt-4o-mini"]["score"] > targets["fast:gpt-4o"]["score"]
    assert "sk-fast-secret-key" not in out


def test_explain_json_round_robin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "explain", "-c", write(tmp_path, MEMORY_CONFIG), "chat-rr", "--json")
    assert code == 0
    doc = json.loads(out)
    assert (doc["strategy"], doc["weights"]) == ("round_robin", None)
    # The reason names the cursor the next request takes, and so does rr_cursor.
    assert doc["reason"].startswith(f"round_robin: cursor {doc['rr_cursor']} ")
    assert len(doc["order"]) == 2


def test_explain_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "explain", "-c", write(tmp_path, MEMORY_CONFIG), "chat")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("route chat (hybrid, weights cost 0.40 / latency 0.40")
    # The JSON's estimate columns too, and the window's statistics, in 100 columns.
    assert lines[1].split() == [
        "TARGET",
        "STATE",
        "SCORE",
        "RANK",
        "EST",
        "MS",
        "ERR",
        "AGE",
        "EXPLORE",
        "IN-FLIGHT",
        "WIN",
        "MS",
        "WIN",
        "OK",
    ]
    assert all(len(line) <= 100 for line in lines[:4])
    # Best first; nothing measured: no estimate, no age, due for exploration.
    assert lines[2].split()[:2] == ["cheap:gpt-4o-mini", "closed"]
    assert lines[2].split()[3] == "1"
    assert lines[2].split()[4:8] == ["-", "-", "-", "stale"]
    assert lines[3].split()[:2] == ["fast:gpt-4o", "closed"]
    assert lines[-1].startswith("reason: hybrid: cheap:gpt-4o-mini")
    assert len(lines) == 5


POLICY_CONFIG = """\
providers:
  - {name: a, base_url: "http://127.0.0.1:9101/v1"}
  - {name: b, base_url: "http://127.0.0.1:9102/v1"}
breaker: {scope: provider}
routes:
  - model: prio
    strategy: priority
    within: cost
    affinity: {key: "body:user"}
    targets:
      - {provider: a, model: m, priority: 1}
      - {provider: b, model: m, priority: 0}
  - model: split
    strategy: weighted
    targets:
      - {provider: a, model: m, weight: 3}
      - {provider: b, model: m}
"""


def test_explain_shows_traffic_policies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write(tmp_path, POLICY_CONFIG)
    code, out, _ = run(capsys, "explain", "-c", config, "prio", "--json")
    assert code == 0
    doc = json.loads(out)
    assert (doc["strategy"], doc["within"], doc["breaker_scope"]) == (
        "priority",
        "cost",
        "provider",
    )
    assert doc["priority_groups"] == [
        {"priority": 0, "targets": ["b:m"]},
        {"priority": 1, "targets": ["a:m"]},
    ]
    assert doc["order"] == ["b:m", "a:m"]
    assert doc["affinity"] == {"key": "body:user", "ttl_s": 600.0, "max_pins": 100000, "pins": 0}
    code, out, _ = run(capsys, "explain", "-c", config, "prio")
    lines = out.splitlines()
    assert lines[0] == "route prio (priority, within cost; state: memory)"
    assert lines[1:4] == [
        "priority groups (lower first): 0: b:m; 1: a:m",
        "breaker scope: provider",
        "affinity: body:user, 0 live pins",
    ]
    code, out, _ = run(capsys, "explain", "-c", config, "split")
    assert "weights: a:m 3 (current 0), b:m 1 (current 0)" in out.splitlines()
    code, out, _ = run(capsys, "explain", "-c", config, "split", "--json")
    targets = {t["target"]: t for t in json.loads(out)["targets"]}
    assert (targets["a:m"]["weight"], targets["a:m"]["priority"]) == (3, None)
    assert json.loads(out)["reason"] == "weighted: a:m (weight 3, credit 3); next b:m (0.250)"


def test_explain_shows_why_a_target_is_excluded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, MEMORY_CONFIG)
    config = load_config(path, env={})
    state = MemoryState()

    async def trip_the_cheap_breaker() -> None:
        router = Router(config, state)
        for _ in range(config.breaker.failure_threshold):
            decision = await router.decide("chat")
            assert decision.admission is not None
            assert decision.admission.target_id == "cheap:gpt-4o-mini"
            await router.record("chat", decision.admission, OutcomeKind.FAILURE, latency_ms=5)
        decision = await router.decide("chat")
        assert decision.admission is not None
        await router.record("chat", decision.admission, OutcomeKind.SUCCESS, latency_ms=250)

    asyncio.run(trip_the_cheap_breaker())
    monkeypatch.setattr(cli, "build_state", lambda _config, **_options: state)

    code, out, _ = run(capsys, "explain", "-c", path, "chat", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["order"] == ["fast:gpt-4o"]
    targets = {t["target"]: t for t in doc["targets"]}
    cheap, fast = targets["cheap:gpt-4o-mini"], targets["fast:gpt-4o"]
    assert cheap["breaker"] == "open"
    assert cheap["admissible"] is False
    assert cheap["rank"] is None and cheap["score"] is None
    assert cheap["excluded"] == "breaker_open"
    assert cheap["excluded_because"] == f"breaker open for {cheap['excluded_for_ms']} ms"
    assert cheap["window"]["failures"] == 3 and cheap["window"]["success_rate"] == 0.0
    assert fast["rank"] == 1
    assert fast["window"]["latency_ms"] == pytest.approx(250.0)
    assert fast["window"]["success_rate"] == 1.0

    code, out, _ = run(capsys, "explain", "-c", path, "chat")
    assert code == 0
    lines = out.splitlines()
    assert all(len(line) <= 100 for line in lines[:4])
    fast_row, cheap_row = lines[2].split(), lines[3].split()
    # SCORE RANK | EST MS ERR AGE EXPLORE | IN-FLIGHT | WIN MS WIN OK, as in the JSON.
    assert fast_row[:2] == ["fast:gpt-4o", "closed"]
    assert fast_row[4:6] == ["250.0", "0%"]  # the decayed estimate and error rate
    assert fast_row[6].endswith(("ms", "s"))  # its age
    assert fast_row[7] == "-"  # fresh: not due for exploration
    assert fast_row[9:] == ["250.0", "100%"]  # the window
    assert cheap_row[:4] == ["cheap:gpt-4o-mini", "open", "-", "-"]
    assert cheap_row[4:7] == ["-", "100%", "-"]  # three failures, no latency measured
    assert lines[4] == "excluded:"  # why, under the table (the ms tick between runs)
    assert lines[5].startswith("  cheap:gpt-4o-mini: breaker open for ")

    code, out, _ = run(capsys, "state", "-c", path, "--route", "chat", "--json")
    assert code == 0
    snapshot = json.loads(out)["routes"]["chat"]
    states = {t["target"]: t["breaker"] for t in snapshot["targets"]}
    assert states == {"fast:gpt-4o": "closed", "cheap:gpt-4o-mini": "open"}


def test_explain_unknown_route(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "explain", "-c", write(tmp_path, MEMORY_CONFIG), "nope")
    assert (code, out) == (2, "")
    assert one_line(err) == "edgeroute: unknown route 'nope' (routes: chat, chat-rr)"
    code, _, err = run(capsys, "explain", "-c", write(tmp_path, MEMORY_CONFIG), "caht")
    assert code == 2
    assert one_line(err) == (
        "edgeroute: unknown route 'caht' (routes: chat, chat-rr); did you mean `chat`?"
    )


def test_explain_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "explain", "-c", write(tmp_path, "server: {port: x}\n"), "chat")
    assert (code, out) == (2, "")
    assert one_line(err).startswith("edgeroute: $.server.port: ")


def test_explain_state_unavailable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Nothing listens on this port: the connection is refused at once.
    url = f"redis://admin:hunter22@127.0.0.1:{free_port()}/0"
    text = f"state: {{redis_url: '{url}'}}\n" + MEMORY_CONFIG
    code, out, err = run(capsys, "explain", "-c", write(tmp_path, text), "chat")
    assert (code, out) == (1, "")
    line = one_line(err)
    assert line.startswith("edgeroute: state unavailable at redis://admin:***@127.0.0.1:")
    assert "hunter22" not in line


# --- state ---------------------------------------------------------------------------------


def test_state_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "state", "-c", write(tmp_path, MEMORY_CONFIG))
    assert code == 0
    assert "in-memory" in one_line(err)
    assert "route chat (hybrid)" in out
    assert "route chat-rr (round_robin, next rr cursor 1)" in out
    for target in ("fast:gpt-4o", "cheap:gpt-4o-mini", "fast:gpt-4o-mini"):
        assert target in out
    assert "TARGET" in out and "IN-FLIGHT" in out


def test_state_json_one_route(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys, "state", "-c", write(tmp_path, MEMORY_CONFIG), "-r", "chat-rr", "--json"
    )
    assert code == 0
    doc = json.loads(out)
    assert (doc["state_backend"], doc["shared_state"]) == ("memory", "local")
    assert list(doc["routes"]) == ["chat-rr"]
    route = doc["routes"]["chat-rr"]
    assert route["route"] == "chat-rr"
    assert [t["target"] for t in route["targets"]] == ["fast:gpt-4o-mini", "cheap:gpt-4o-mini"]
    assert all(t["breaker"] == "closed" and t["in_flight"] == 0 for t in route["targets"])


def test_state_unknown_route(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "state", "-c", write(tmp_path, MEMORY_CONFIG), "--route", "x")
    assert (code, out) == (2, "")
    assert one_line(err).startswith("edgeroute: unknown route 'x'")


def test_state_without_routes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "state", "-c", write(tmp_path, "{}\n"))
    assert (code, out) == (0, "no routes configured (state: memory)\n")


# --- state and explain need only Redis ----------------------------------------------------


@pytest.mark.parametrize("argv", [["state"], ["explain", "chat"], ["state", "--json"]])
def test_state_and_explain_need_no_provider_secrets(
    argv: list[str],
    redis_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The full example needs six variables to serve; reading the fleet's state needs none.
    for name in FULL_EXAMPLE_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EDGEROUTE_REDIS_URL", redis_url)
    code, out, err = run(capsys, argv[0], "-c", str(FULL_EXAMPLE), *argv[1:])
    assert (code, err) == (0, ""), err
    assert "chat" in out and "<unset" not in out


def test_serving_still_needs_every_secret(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in FULL_EXAMPLE_ENV:
        monkeypatch.delenv(name, raising=False)
    code, out, err = run(capsys, "serve", "-c", str(FULL_EXAMPLE))
    assert (code, out) == (2, "")
    assert len(err.splitlines()) == len(FULL_EXAMPLE_ENV)


def test_state_still_checks_what_it_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = MEMORY_CONFIG.replace("strategy: round_robin", "strategy: round-robin")
    code, out, err = run(capsys, "state", "-c", write(tmp_path, text))
    assert (code, out) == (2, "")
    assert one_line(err).startswith("edgeroute: $.routes[1].strategy (route chat-rr): ")
    assert "did you mean `round_robin`?" in err


# --- check --connect -----------------------------------------------------------------------


def test_check_connect_reaches_redis_and_loads_the_scripts(
    redis_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EDGEROUTE_REDIS_URL", redis_url)
    code, out, err = run(capsys, "check", "--connect", "-c", write(tmp_path, MEMORY_CONFIG))
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].startswith("config OK: 2 providers, 2 routes (state: redis ")
    assert lines[1].startswith("state OK: reached ")
    assert lines[1].endswith(", loaded the scripts and read 2 routes")


def test_check_connect_in_memory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "check", "--connect", "-c", write(tmp_path, MEMORY_CONFIG))
    assert code == 0
    assert out.splitlines()[1] == "state OK: in-memory, nothing to connect to"


def test_check_connect_unreachable_redis_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A typo'd port: `check` alone cannot know, `--connect` says so.
    url = f"redis://ops:hunter22@127.0.0.1:{free_port()}/0"
    text = f"state: {{redis_url: '{url}'}}\n" + MEMORY_CONFIG
    assert run(capsys, "check", "-c", write(tmp_path, text))[0] == 0
    code, out, err = run(capsys, "check", "--connect", "-c", write(tmp_path, text))
    assert (code, out) == (1, "")
    line = one_line(err)
    assert line.startswith("edgeroute: state unavailable at redis://ops:***@127.0.0.1:")
    assert "hunter22" not in line


# --- arguments -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [[], ["frobnicate"], ["check"], ["explain", "-c", "x.yaml"], ["check", "-c", "x", "--nope"]],
)
def test_bad_flags_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage: edgeroute" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("edgeroute ")


def test_build_parser_lists_the_subcommands() -> None:
    help_text = build_parser().format_help()
    for command in ("check", "explain", "state", "mock-provider"):
        assert command in help_text


# --- mock-provider -------------------------------------------------------------------------


def test_mock_provider_delegates(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeroute import mock_provider

    calls: list[tuple[str, int, Any, str]] = []

    def fake_serve(host: str, port: int, settings: Any, name: str = "mock") -> None:
        calls.append((host, port, settings, name))

    monkeypatch.setattr(mock_provider, "serve_mock_provider", fake_serve)
    code = main(
        [
            "mock-provider",
            "--port",
            "9101",
            "--host",
            "0.0.0.0",
            "--latency-ms",
            "25",
            "--error-rate",
            "0.1",
            "--stream-chunks",
            "3",
            "--name",
            "mock-fast",
            "--fault",
            "rate_limit",
            "--retry-after-s",
            "2.5",
            "--status",
            "529",
            "--cut-after-chunks",
            "2",
            "--first-token-delay-ms",
            "40",
        ]
    )
    assert code == 0
    ((host, port, settings, name),) = calls
    assert (host, port, name) == ("0.0.0.0", 9101, "mock-fast")
    assert settings.latency_ms == 25
    assert settings.error_rate == pytest.approx(0.1)
    assert settings.stream_chunks == 3
    assert settings.fault == "rate_limit"
    assert (settings.retry_after_s, settings.status) == (2.5, 529)
    assert (settings.cut_after_chunks, settings.first_token_delay_ms) == (2, 40)


@pytest.mark.parametrize(
    "argv",
    [
        ["--port", "x"],
        ["--fault", "explode", "--port", "1"],
        ["--error-rate", "2", "--port", "1"],
        [],
    ],
)
def test_mock_provider_bad_flags(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["mock-provider", *argv])
    assert info.value.code == 2
    assert one_line(capsys.readouterr().err).startswith("edgeroute mock-provider: error: ")


def test_mock_provider_cannot_listen(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgeroute import mock_provider

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError(98, "Address already in use")

    monkeypatch.setattr(mock_provider, "serve_mock_provider", refuse)
    code, _, err = run(capsys, "mock-provider", "--port", "9101")
    assert code == 1
    assert "cannot listen on 127.0.0.1:9101" in one_line(err)


# --- real subprocesses ---------------------------------------------------------------------


def test_subprocess_check_ok_and_bad(tmp_path: Path) -> None:
    command = edgeroute_command()
    ok = subprocess.run(
        [*command, "check", "--config", str(QUICKSTART)],
        capture_output=True,
        text=True,
        timeout=60,
        env=subprocess_env(),
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == "config OK: 2 providers, 2 routes (state: memory)\n"
    assert ok.stderr == ""

    bad = subprocess.run(
        [*command, "check", "-c", write(tmp_path, "server: {port: -5}\n")],
        capture_output=True,
        text=True,
        timeout=60,
        env=subprocess_env(),
        check=False,
    )
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert one_line(bad.stderr).startswith("edgeroute: $.server.port: ")

    missing = subprocess.run(
        [*command, "check", "-c", str(tmp_path / "absent.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        env=subprocess_env(),
        check=False,
    )
    assert missing.returncode == 2
    assert one_line(missing.stderr).startswith("edgeroute: $: cannot read ")


def test_subprocess_module_entry_point_masks_secrets() -> None:
    env = subprocess_env(
        **FULL_EXAMPLE_ENV, EDGEROUTE_REDIS_URL="redis://ops:pa55word99@redis.internal:6379/0"
    )
    result = subprocess.run(
        [sys.executable, "-m", "edgeroute.cli", "check", "-c", str(FULL_EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=REPO_ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        "config OK: 4 providers, 6 routes (state: redis redis://ops:***@redis.internal:6379/0)\n"
    )
    combined = result.stdout + result.stderr
    assert "pa55word99" not in combined
    for secret in FULL_EXAMPLE_ENV.values():
        if "secret" in secret:
            assert secret not in combined


def test_subprocess_mock_provider_serves_and_stops() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [*edgeroute_command(), "mock-provider", "--port", str(port), "--name", "cli-mock"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == f"mock-provider cli-mock listening on http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 10
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
                    assert r.status == 200
                    assert json.loads(r.read())["data"]
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)


# --- serve with no config file -------------------------------------------------------------


def start_process(argv: list[str], env: dict[str, str], ready: str) -> subprocess.Popen[str]:
    """Start `edgeroute ...` and wait for the stdout line containing `ready`."""
    proc = subprocess.Popen(
        [*edgeroute_command(), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if ready in line:
            return proc
        if not line and proc.poll() is not None:
            break
    proc.kill()
    _, err = proc.communicate(timeout=10)
    raise AssertionError(f"{argv[0]} did not start: {err[-2000:]}")


def stop_process(proc: subprocess.Popen[str]) -> str:
    """SIGTERM, wait, and return what it wrote on stderr."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate(timeout=10)
    return err


def test_serve_models_with_no_config_file() -> None:
    import openai

    # Two mock-provider processes stand in for OpenAI and (in Anthropic mode) for Anthropic.
    openai_port, anthropic_port, gateway_port = free_port(), free_port(), free_port()
    mocks = [
        start_process(
            ["mock-provider", "--port", str(port), "--name", name], subprocess_env(), "listening"
        )
        for port, name in ((openai_port, "fake-openai"), (anthropic_port, "fake-anthropic"))
    ]
    env = subprocess_env(
        OPENAI_API_KEY="sk-openai-secret-1234",
        OPENAI_BASE_URL=f"http://127.0.0.1:{openai_port}/v1",
        ANTHROPIC_API_KEY="sk-ant-secret-5678",
        ANTHROPIC_BASE_URL=f"http://127.0.0.1:{anthropic_port}/v1",
    )
    argv = ["serve", "--model", "gpt-4o-mini", "-m", "claude-3-5-haiku-latest"]
    gateway = start_process([*argv, "--port", str(gateway_port)], env, "listening on")
    try:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{gateway_port}/v1", api_key="unused", max_retries=0
        )
        assert [m.id for m in client.models.list()] == [
            "gpt-4o-mini",
            "claude-3-5-haiku-latest",
            "auto",
        ]
        for model, upstream in (
            ("gpt-4o-mini", "fake-openai"),
            ("claude-3-5-haiku-latest", "fake-anthropic"),
            ("auto", "fake-openai"),
        ):
            reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}]
            )
            content = reply.choices[0].message.content or ""
            assert content.startswith(f"Hello from {upstream} "), (model, content)
        # `auto` fails over to the next model when the first one fails.
        urllib.request.urlopen(
            urllib.request.Request(
                f"http://127.0.0.1:{openai_port}/_mock/config",
                data=b'{"error_rate": 1}',
                method="POST",
            ),
            timeout=10,
        ).close()
        raw = client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": "hi"}]
        )
        assert raw.headers["x-edgeroute-provider"] == "anthropic"
        assert raw.headers["x-edgeroute-attempts"] == "2"
    finally:
        err = stop_process(gateway)
        for mock in mocks:
            stop_process(mock)
    assert gateway.returncode == 0, err
    assert err.splitlines()[0] == (
        "edgeroute: no config file; models: gpt-4o-mini (openai), claude-3-5-haiku-latest "
        "(anthropic), auto (gpt-4o-mini, then claude-3-5-haiku-latest)"
    )
    assert "secret" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve"], "edgeroute: serve needs --config FILE, or --model MODEL"),
        (["serve", "-c", "x.yaml", "-m", "gpt-4o"], "edgeroute: give --config FILE or --model"),
        (["serve", "-m", "gpt-4o"], "edgeroute: --model gpt-4o: set OPENAI_API_KEY"),
    ],
)
def test_serve_argument_errors(
    argv: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    code, out, err = run(capsys, *argv)
    assert (code, out) == (2, "")
    assert one_line(err).startswith(message)


def test_serve_refuses_a_config_without_routes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "serve", "-c", write(tmp_path, "server: {port: 0}\n"))
    assert code == 2
    assert one_line(err).startswith("edgeroute: $.routes: no routes configured")


# --- the real-provider examples, with the mock standing in ---------------------------------


OPENAI_EXAMPLE = EXAMPLES / "openai.yaml"
OPENAI_ANTHROPIC_EXAMPLE = EXAMPLES / "openai-anthropic.yaml"


async def test_openai_example_falls_back_to_the_second_model() -> None:
    import openai

    from edgeroute.server import create_app
    from tests.support.gateway import mock_upstreams, running_app

    async with mock_upstreams(fake=MockSettings()) as mocks:
        env = {"OPENAI_API_KEY": "sk-x", "OPENAI_BASE_URL": mocks["fake"].base_url}
        config = load_config(OPENAI_EXAMPLE, env=env)
        assert [p.name for p in config.providers] == ["openai"]
        async with (
            running_app(create_app(config)) as url,
            openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as client,
        ):
            messages: list[Any] = [{"role": "user", "content": "hi"}]
            raw = await client.chat.completions.with_raw_response.create(
                model="chat", messages=messages
            )
            assert raw.headers["x-edgeroute-model"] == "gpt-4o-mini"  # the cheaper first
            await mocks["fake"].configure(fault="status", status=503, fault_count=1)
            raw = await client.chat.completions.with_raw_response.create(
                model="chat", messages=messages
            )
            assert raw.headers["x-edgeroute-model"] == "gpt-4o"  # then the fallback
            assert raw.headers["x-edgeroute-attempts"] == "2"
            assert (mocks["fake"].provider.last_authorization or "") == "Bearer sk-x"


async def test_openai_anthropic_example_reaches_both_apis() -> None:
    import openai

    from edgeroute.server import create_app
    from tests.support.gateway import mock_upstreams, running_app

    async with mock_upstreams(fake=MockSettings()) as mocks:
        base = mocks["fake"].base_url
        env = {
            "OPENAI_API_KEY": "sk-x",
            "ANTHROPIC_API_KEY": "sk-ant-x",
            "OPENAI_BASE_URL": base,
            "ANTHROPIC_BASE_URL": base,
        }
        config = load_config(OPENAI_ANTHROPIC_EXAMPLE, env=env)
        async with (
            running_app(create_app(config)) as url,
            openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as client,
        ):
            providers = set()
            for _ in range(2):  # round robin: one request to each
                raw = await client.chat.completions.with_raw_response.create(
                    model="smart", messages=[{"role": "user", "content": "hi"}]
                )
                assert (raw.parse().choices[0].message.content or "").startswith("Hello from")
                providers.add(raw.headers["x-edgeroute-provider"])
            assert providers == {"openai", "anthropic"}
        stats = await mocks["fake"].stats()
        assert stats["by_path"] == {"/v1/chat/completions": 1, "/v1/messages": 1}


def test_redactor_masks_client_keys_plain_and_hashed() -> None:
    from edgeroute.config import parse_config

    hashed = "sha256:" + "ab" * 32
    config = parse_config(
        {
            "providers": [{"name": "p", "base_url": "http://127.0.0.1:1/v1"}],
            "routes": [{"model": "m", "targets": [{"provider": "p", "model": "x"}]}],
            "server": {
                "clients": [
                    {"name": "team", "key": "sk-team-plain-key"},
                    {"name": "ops", "key": hashed},
                ]
            },
        },
        env={},
    )
    redact = Redactor()
    redact.add_config(config)
    assert redact(f"a sk-team-plain-key and {hashed}") == "a *** and ***"
