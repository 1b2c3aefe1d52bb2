"""The deployment files agree with each other and with the code.

Dockerfile, .dockerignore, compose.yaml and deploy/ (the compose fleet's edgeroute config,
nginx.conf, prometheus.yml, the alert rules) are parsed and cross-checked: the same replicas
everywhere, the same ports, a config the gateway accepts. Tools run where they exist:
`promtool` (required when CI=true), `docker compose config` and `nginx -t` (skipped when
absent). No Docker engine is needed: the fleet itself is rehearsed on loopback, with the
commands and config compose would run, against a real Redis.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
import uuid
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from edgeroute.config import Config, load_config
from edgeroute.metrics import Metrics
from edgeroute.mock_provider import build_arg_parser, settings_from_args
from tests.support.ci import missing
from tests.support.gateway import HOST, GatewayProcess

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "compose.yaml"
COMPOSE_DIR = ROOT / "deploy" / "compose"
GATEWAY_CONFIG = COMPOSE_DIR / "edgeroute.yaml"
NGINX_CONF = COMPOSE_DIR / "nginx.conf"
PROMETHEUS_YML = COMPOSE_DIR / "prometheus.yml"
ALERTS = ROOT / "deploy" / "prometheus" / "edgeroute-alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "edgeroute-alerts.test.yml"

GATEWAYS = ("gateway-1", "gateway-2", "gateway-3")
MOCKS = ("mock-fast", "mock-cheap", "mock-flaky")
IMAGE_CONFIG_PATH = "/etc/edgeroute/config.yaml"
SERVE = ["edgeroute", "serve", "--config", IMAGE_CONFIG_PATH]
GATEWAY_PORT = 8080
ADMIN_TOKEN = "demo-admin"


# --- compose ------------------------------------------------------------------------------


@functools.cache
def _compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(document, dict)
    return document


def _service(name: str) -> dict[str, Any]:
    services = _compose()["services"]
    assert name in services, f"compose.yaml has no service {name!r}"
    service = services[name]
    assert isinstance(service, dict)
    return service


_COMPOSE_VAR = re.compile(
    r"\$\$|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


def _compose_interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `$VAR` and `$$`."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("braced") or match.group("bare")
        op, arg = match.group("op"), match.group("arg") or ""
        current = env.get(name)
        if op == ":-":
            return current if current else arg
        if op == "-":
            return current if current is not None else arg
        if op in (":?", "?") and not current:
            raise AssertionError(f"compose requires {name}: {arg}")
        return current or ""

    return _COMPOSE_VAR.sub(substitute, value)


def _environment(service: dict[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    return {key: _compose_interpolate(str(value), env) for key, value in raw.items()}


def _gateway_env() -> dict[str, str]:
    """What a gateway container sees, with nothing set on the host (the demo defaults)."""
    return _environment(_service(GATEWAYS[0]), {})


def _healthcheck_argv(service: dict[str, Any]) -> list[str]:
    test = service["healthcheck"]["test"]
    if isinstance(test, str):
        return ["/bin/sh", "-c", test]
    assert test[0] in ("CMD", "CMD-SHELL"), test
    return ["/bin/sh", "-c", test[1]] if test[0] == "CMD-SHELL" else list(test[1:])


def _depends(service: dict[str, Any]) -> dict[str, str]:
    depends = service.get("depends_on") or {}
    assert isinstance(depends, dict), "depends_on must use the long form with conditions"
    return {name: spec["condition"] for name, spec in depends.items()}


def _published(service: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(host ip, published port, container port) for each short-form port mapping."""
    mappings = []
    for entry in service.get("ports") or []:
        parts = str(entry).split(":")
        assert len(parts) in (2, 3), entry
        ip = parts[0] if len(parts) == 3 else ""
        mappings.append((ip, int(parts[-2]), int(parts[-1])))
    return mappings


def _option(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_compose_defines_the_whole_fleet() -> None:
    services = set(_compose()["services"])
    expected = {"redis", "lb", "prometheus", *GATEWAYS, *MOCKS}
    assert expected <= services, f"missing: {expected - services}"
    # Every service that runs the gateway (image with its default command) is a listed
    # replica, so the nginx and Prometheus lists below cover the whole fleet.
    gateways = {
        name
        for name, service in _compose()["services"].items()
        if "build" in service and "command" not in service
    }
    assert gateways == set(GATEWAYS)


def test_redis_is_health_checked() -> None:
    redis = _service("redis")
    assert str(redis["image"]).startswith("redis:7")
    argv = _healthcheck_argv(redis)
    assert argv[:2] == ["redis-cli", "ping"]


@pytest.mark.parametrize("name", GATEWAYS)
def test_gateway_replicas_share_redis_and_run_read_only(name: str) -> None:
    service = _service(name)
    assert service["build"]["context"] == "."
    assert service["build"].get("dockerfile", "Dockerfile") == "Dockerfile"
    assert "command" not in service and "entrypoint" not in service  # the image's serve
    assert _environment(service, {})["EDGEROUTE_REDIS_URL"] == "redis://redis:6379/0"
    assert service["read_only"] is True
    assert "/tmp" in service["tmpfs"]
    mounts = {volume.split(":")[1]: volume.split(":") for volume in service["volumes"]}
    source, _, mode = mounts[IMAGE_CONFIG_PATH]
    assert (ROOT / source).resolve() == GATEWAY_CONFIG
    assert mode == "ro"
    assert "ports" not in service  # reached through the load balancer only
    argv = _healthcheck_argv(service)
    assert argv[0] == "python" and f"127.0.0.1:{GATEWAY_PORT}/healthz" in argv[-1]
    depends = _depends(service)
    assert depends["redis"] == "service_healthy"
    for mock in MOCKS:
        assert depends[mock] == "service_healthy"


def test_the_load_balancer_is_the_one_entry_point() -> None:
    lb = _service("lb")
    assert str(lb["image"]).startswith("nginx:")
    assert _published(lb) == [("127.0.0.1", 8080, 8080)]
    assert _depends(lb) == dict.fromkeys(GATEWAYS, "service_healthy")
    mounts = [volume.split(":") for volume in lb["volumes"]]
    assert [(ROOT / m[0]).resolve() for m in mounts] == [NGINX_CONF]
    assert mounts[0][1] == "/etc/nginx/nginx.conf" and mounts[0][2] == "ro"
    assert "healthcheck" in lb


@pytest.mark.parametrize("name", MOCKS)
def test_mock_providers_run_the_image_on_all_interfaces(name: str) -> None:
    service = _service(name)
    assert service["image"] == _service(GATEWAYS[0])["image"]
    command = [str(arg) for arg in service["command"]]
    assert command[0] == "mock-provider"
    args = build_arg_parser().parse_args(command[1:])
    settings_from_args(args)  # the same validation the CLI applies
    assert args.host == "0.0.0.0"
    assert args.name == name
    assert _published(service) == [("127.0.0.1", args.port, args.port)]
    argv = _healthcheck_argv(service)
    assert f"127.0.0.1:{args.port}/healthz" in argv[-1]


def test_mock_providers_differ() -> None:
    behaviours = set()
    for name in MOCKS:
        args = build_arg_parser().parse_args([str(a) for a in _service(name)["command"][1:]])
        behaviours.add((args.latency_ms, args.error_rate))
    assert len(behaviours) == len(MOCKS)
    assert any(error_rate > 0 for _, error_rate in behaviours)  # something to fail over from


@functools.cache
def _fleet_config() -> Config:
    return load_config(GATEWAY_CONFIG, env=_gateway_env())


def test_the_mounted_gateway_config_is_valid_with_the_compose_env() -> None:
    env = _gateway_env()
    assert env["EDGEROUTE_REDIS_URL"] == "redis://redis:6379/0"
    config = _fleet_config()
    assert config.server.host == "0.0.0.0"
    assert config.server.port == GATEWAY_PORT
    assert config.server.admin_token == ADMIN_TOKEN
    assert config.state.redis_url == "redis://redis:6379/0"
    strategies = {route.strategy for route in config.routes}
    assert {"hybrid", "round_robin", "least_busy"} <= strategies
    # Stops the gateway within compose's grace period.
    grace = _service(GATEWAYS[0])["stop_grace_period"]
    assert config.server.shutdown_timeout_s < int(str(grace).rstrip("s"))


def test_the_admin_token_can_be_overridden() -> None:
    env = _environment(_service(GATEWAYS[0]), {"EDGEROUTE_ADMIN_TOKEN": "s3cret-token"})
    assert load_config(GATEWAY_CONFIG, env=env).server.admin_token == "s3cret-token"


def test_every_provider_is_a_compose_mock_on_its_port() -> None:
    config = _fleet_config()
    assert {provider.name for provider in config.providers} == set(MOCKS)
    for provider in config.providers:
        url = urlsplit(provider.base_url)
        assert url.hostname in MOCKS
        command = [str(arg) for arg in _service(url.hostname)["command"]]
        assert url.port == int(_option(command, "--port"))
        assert url.path == "/v1"


def test_prometheus_scrapes_every_replica_and_loads_the_alerts() -> None:
    document = yaml.safe_load(PROMETHEUS_YML.read_text())
    targets = {
        target
        for job in document["scrape_configs"]
        if job["job_name"] == "edgeroute"
        for static in job["static_configs"]
        for target in static["targets"]
    }
    assert targets == {f"{name}:{GATEWAY_PORT}" for name in GATEWAYS}
    (rule_file,) = document["rule_files"]
    assert (PROMETHEUS_YML.parent / rule_file).resolve() == ALERTS

    # In the container the same relative path must resolve: compose mounts deploy/ whole
    # and points --config.file into it.
    prometheus = _service("prometheus")
    (mount,) = prometheus["volumes"]
    source, target, mode = mount.split(":")
    assert (ROOT / source).resolve() == ROOT / "deploy" and mode == "ro"
    config_file = next(
        arg.split("=", 1)[1] for arg in prometheus["command"] if arg.startswith("--config.file=")
    )
    in_container = PurePosixPath(config_file).relative_to(target)
    assert (ROOT / "deploy" / in_container).resolve() == PROMETHEUS_YML


def _nginx_upstream_servers() -> list[str]:
    text = re.sub(r"#[^\n]*", "", NGINX_CONF.read_text())
    block = re.search(r"upstream\s+\S+\s*\{(.*?)\}", text, re.S)
    assert block, "nginx.conf has no upstream block"
    return re.findall(r"^\s*server\s+(\S+?)[\s;]", block.group(1), re.M)


def test_nginx_balances_over_every_replica() -> None:
    assert sorted(_nginx_upstream_servers()) == [f"{name}:{GATEWAY_PORT}" for name in GATEWAYS]
    text = NGINX_CONF.read_text()
    listens = re.findall(r"^\s*listen\s+(\d+)", text, re.M)
    assert listens == [str(_published(_service("lb"))[0][2])]
    assert re.search(r"^\s*proxy_buffering\s+off;", text, re.M)  # SSE streams flow through


def test_nginx_accepts_the_config(tmp_path: Path) -> None:
    nginx = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    if nginx is None:
        missing("nginx", install="Debian package nginx")
    # The replica names only resolve inside compose's network: check a copy on loopback.
    text = NGINX_CONF.read_text()
    for name in GATEWAYS:
        text = text.replace(f"{name}:{GATEWAY_PORT}", f"127.0.0.1:{GATEWAY_PORT}")
    conf = tmp_path / "nginx.conf"
    conf.write_text(text)
    result = subprocess.run(
        [nginx, "-t", "-q", "-p", str(tmp_path), "-c", str(conf), "-e", "stderr"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr


def test_docker_compose_config_accepts_the_file() -> None:
    docker = shutil.which("docker")
    candidates = [[docker, "compose"]] if docker else []
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    for base in candidates:
        probe = subprocess.run([*base, "version"], capture_output=True, text=True, timeout=30)
        if probe.returncode != 0:
            continue
        result = subprocess.run(
            [*base, "-f", str(COMPOSE), "config", "--quiet"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        if result.returncode != 0 and "daemon" in result.stderr.lower():
            pytest.skip(f"`{' '.join(base)} config` needs a Docker daemon here")
        assert result.returncode == 0, result.stderr
        return
    pytest.skip("no docker compose CLI")


# --- Dockerfile ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Instruction:
    keyword: str
    args: str
    stage: int  # index of the FROM it belongs to; -1 before the first FROM


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuations joined and comment lines dropped, as Docker reads them."""
    instructions: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue  # comments (also inside continuations) and blank lines
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        line = (pending + stripped).strip()
        pending = ""
        if not line:
            continue
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, args.strip(), stage))
    assert not pending, "Dockerfile ends inside a continuation"
    return instructions


@functools.cache
def _dockerfile() -> tuple[Instruction, ...]:
    return tuple(parse_dockerfile(DOCKERFILE.read_text()))


def _stages() -> list[tuple[str, str]]:
    """(image, name) of each stage, with ARG defaults declared before FROM substituted."""
    args: dict[str, str] = {}
    stages = []
    for ins in _dockerfile():
        if ins.keyword == "ARG" and ins.stage == -1:
            name, _, default = ins.args.partition("=")
            args[name] = default.strip("\"'")
        elif ins.keyword == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--")]
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m[1] or m[2]], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            stages.append((image, name))
    return stages


def _in_stage(stage: int, keyword: str) -> list[Instruction]:
    return [ins for ins in _dockerfile() if ins.stage == stage and ins.keyword == keyword]


def _exec_form(args: str) -> list[str]:
    assert args.startswith("["), f"use the exec (JSON) form: {args}"
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def _copy_parts(ins: Instruction) -> tuple[dict[str, str], list[str], str]:
    words = shlex.split(ins.args)
    flags = dict(w[2:].partition("=")[::2] for w in words if w.startswith("--"))
    paths = [w for w in words if not w.startswith("--")]
    return flags, paths[:-1], paths[-1]


def _final() -> int:
    return len(_stages()) - 1


def test_dockerfile_is_multi_stage_on_slim_python_311() -> None:
    stages = _stages()
    assert len(stages) >= 2
    for image, _ in stages:
        assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", image), image
    builder = stages[0][1]
    assert builder
    copies_from = [_copy_parts(ins)[0].get("from") for ins in _in_stage(_final(), "COPY")]
    assert builder in copies_from, "the runtime stage must copy the builder's venv"


def test_dockerfile_builds_a_wheel_with_the_lua_scripts_and_the_fast_extra() -> None:
    sources = {
        src.rstrip("/")
        for ins in _in_stage(0, "COPY")
        for src in _copy_parts(ins)[1]
        if "from" not in _copy_parts(ins)[0]
    }
    assert {"pyproject.toml", "README.md", "edgeroute", "lua"} <= sources
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    force_include = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    assert force_include.get("lua") == "edgeroute/lua"  # how lua/ gets into the wheel
    run = " ".join(ins.args for ins in _in_stage(0, "RUN"))
    assert "pip wheel" in run
    assert re.search(r"pip install [^&]*\.whl[^&]*\[fast\]", run)
    # The runtime stage gets the Lua through the installed package, not the build context.
    for ins in _in_stage(_final(), "COPY"):
        assert "from" in _copy_parts(ins)[0], f"runtime stage copies from the context: {ins.args}"


def test_dockerfile_runtime_is_non_root_and_read_only_friendly() -> None:
    final = _final()
    users = _in_stage(final, "USER")
    assert users, "the runtime stage needs a USER"
    uid, _, gid = users[-1].args.partition(":")
    assert uid.isdigit() and int(uid) > 0, "numeric, non-root uid (runAsNonRoot can check it)"
    assert not gid or (gid.isdigit() and int(gid) > 0)
    env = " ".join(ins.args for ins in _in_stage(final, "ENV"))
    assert re.search(r"\bPYTHONDONTWRITEBYTECODE=1\b", env)
    assert re.search(r"\bHOME=/tmp\b", env)
    exposed = {p for ins in _in_stage(final, "EXPOSE") for p in ins.args.split()}
    assert str(GATEWAY_PORT) in exposed or f"{GATEWAY_PORT}/tcp" in exposed


def _healthcheck_command() -> list[str]:
    (check,) = _in_stage(_final(), "HEALTHCHECK")
    options, _, command = check.args.partition("CMD")
    assert "--interval" in options and "--timeout" in options
    return _exec_form(command.strip())


def _entrypoint_and_cmd() -> list[str]:
    final = _final()
    entrypoint = _in_stage(final, "ENTRYPOINT")
    cmd = _in_stage(final, "CMD")
    return [
        *(_exec_form(entrypoint[-1].args) if entrypoint else []),
        *(_exec_form(cmd[-1].args) if cmd else []),
    ]


def test_dockerfile_runs_edgeroute_serve_with_the_mounted_config() -> None:
    assert _entrypoint_and_cmd() == SERVE


def test_dockerfile_healthcheck_uses_python_on_healthz() -> None:
    argv = _healthcheck_command()
    assert argv[0] == "python"  # no curl in a slim image
    assert f"127.0.0.1:{GATEWAY_PORT}/healthz" in argv[-1]


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/healthz" else 503)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer((HOST, 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{HOST}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _run_healthcheck(argv: list[str], env: Mapping[str, str] | None = None) -> int:
    command = [sys.executable if argv[0] == "python" else argv[0], *argv[1:]]
    return subprocess.run(
        command, capture_output=True, timeout=30, env={**os.environ, **(env or {})}
    ).returncode


def test_dockerfile_healthcheck_fails_unless_healthz_answers_200(health_server: str) -> None:
    argv = _healthcheck_command()
    assert _run_healthcheck(argv, {"EDGEROUTE_HEALTHCHECK_URL": f"{health_server}/healthz"}) == 0
    assert _run_healthcheck(argv, {"EDGEROUTE_HEALTHCHECK_URL": f"{health_server}/down"}) != 0
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind((HOST, 0))
        closed = f"http://{HOST}:{sock.getsockname()[1]}/healthz"
    assert _run_healthcheck(argv, {"EDGEROUTE_HEALTHCHECK_URL": closed}) != 0


# --- .dockerignore and the build context ---------------------------------------------------


@functools.cache
def _ignore_patterns() -> tuple[str, ...]:
    patterns = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            assert not line.startswith("!"), "the matcher below handles no exceptions"
            patterns.append(line.strip("/"))
    return tuple(patterns)


def _ignored(relative: str) -> bool:
    """Whether .dockerignore keeps `relative` (or a parent directory) out of the context."""
    parts = PurePosixPath(relative).parts
    for i in range(1, len(parts) + 1):
        prefix = "/".join(parts[:i])
        for pattern in _ignore_patterns():
            if fnmatch(prefix, pattern):
                return True
            if pattern.startswith("**/") and fnmatch(parts[i - 1], pattern[3:]):
                return True
    return False


def test_dockerignore_keeps_local_state_out_of_the_context() -> None:
    for path in (
        ".git",
        ".venv",
        ".venv-test",
        "venv",
        ".pytest_cache",
        ".mypy_cache",
        ".ruff_cache",
        "edgeroute/__pycache__/x.pyc",
        "dist",
        "build",
        ".hypothesis",
        ".env",
    ):
        assert _ignored(path), path
    # ...but not what the image is built from.
    for ins in _dockerfile():
        if ins.keyword in ("COPY", "ADD") and "from" not in _copy_parts(ins)[0]:
            for source in _copy_parts(ins)[1]:
                assert not _ignored(source.rstrip("/")), f"{source} is in .dockerignore"


def _context_copy(destination: Path) -> Path:
    """Replay the builder stage's COPY instructions (honouring .dockerignore) into a dir."""
    workdirs = _in_stage(0, "WORKDIR")
    workdir = PurePosixPath(workdirs[0].args if workdirs else "/")
    for ins in _in_stage(0, "COPY"):
        flags, sources, target = _copy_parts(ins)
        assert "from" not in flags
        dest = destination / (workdir / target).relative_to(workdir)
        for source in sources:
            path = ROOT / source
            if path.is_dir():  # Docker copies a directory's contents into the target
                for file in path.rglob("*"):
                    relative = file.relative_to(ROOT).as_posix()
                    if file.is_file() and not _ignored(relative):
                        out = dest / file.relative_to(path)
                        out.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(file, out)
            else:
                out = dest / path.name if target.endswith("/") else dest
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, out)
    return destination


def test_the_image_build_context_makes_a_wheel_that_carries_its_lua(tmp_path: Path) -> None:
    """What the builder stage sees is enough for a wheel whose package finds its Lua alone.

    (tests/test_redis_state.py checks the wheel of the whole checkout; this one checks the
    Dockerfile's COPY set and .dockerignore, then imports the package from the wheel alone.)
    """
    try:
        import hatchling  # noqa: F401
    except ImportError:
        missing("hatchling (pip wheel --no-build-isolation)", install="pip install -e '.[test]'")
    context = _context_copy(tmp_path / "src")
    dist = tmp_path / "dist"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            str(context),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = dist.glob("edgeroute-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for script in sorted((ROOT / "lua").glob("*.lua")):
        assert f"edgeroute/lua/{script.name}" in names
    assert "edgeroute/lua/decide.lua" in names

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = (
        "import edgeroute, sys\n"
        "from edgeroute.state.scripts import load_scripts\n"
        f"assert edgeroute.__file__.startswith({str(site)!r}), edgeroute.__file__\n"
        "print(sorted(load_scripts()))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "decide" in result.stdout


# --- alert rules and promtool --------------------------------------------------------------


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        missing("promtool", install="Debian package prometheus")
    return path


def _run_promtool(*args: str) -> None:
    result = subprocess.run(
        [_promtool(), *args], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_checks_the_alert_rules() -> None:
    _run_promtool("check", "rules", str(ALERTS))


def test_promtool_unit_tests_the_alert_rules() -> None:
    _run_promtool("test", "rules", str(ALERT_TESTS))


def test_promtool_checks_the_compose_prometheus_config() -> None:
    _run_promtool("check", "config", str(PROMETHEUS_YML))


@functools.cache
def _alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def _exported_metric_names() -> set[str]:
    """Every series name /metrics can expose, with Prometheus' suffixes."""
    names = set()
    for family in Metrics().registry.collect():
        if family.type == "counter":
            names |= {f"{family.name}_total", f"{family.name}_created"}
        elif family.type == "histogram":
            names |= {f"{family.name}_{s}" for s in ("bucket", "sum", "count", "created")}
        else:
            names.add(family.name)
    return names


def test_alert_rules_are_documented_and_use_real_metrics() -> None:
    exported = _exported_metric_names()
    # The request path's outcome labels: every way a request can end.
    proxy_source = "".join(
        (ROOT / "edgeroute" / f"{module}.py").read_text()
        for module in ("proxy", "streaming", "request", "accounting")
    )
    for rule in _alert_rules():
        name = rule.get("alert")
        assert name, f"recording rules are not expected here: {rule}"
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        for annotation in ("summary", "description", "runbook"):
            assert rule["annotations"].get(annotation), f"{name} lacks {annotation}"
        used = set(re.findall(r"\bedgeroute_[a-z_]+\b", rule["expr"]))
        assert used <= exported, f"{name} uses unknown metrics {used - exported}"
        for outcome in re.findall(r'outcome=~?"([^"]+)"', rule["expr"]):
            for value in outcome.split("|"):
                assert f'"{value}"' in proxy_source, (
                    f"{name}: no outcome {value!r} on the request path"
                )


def test_alert_rules_cover_what_operators_need() -> None:
    exprs = {rule["alert"]: rule["expr"] for rule in _alert_rules()}
    assert "edgeroute_state_degraded == 1" in exprs["EdgerouteStateDegraded"]

    def alerting_on(*needles: str) -> bool:
        return any(all(n in expr for n in needles) for expr in exprs.values())

    assert alerting_on("edgeroute_breaker_state")
    assert alerting_on('outcome="all_providers_failed"')
    assert alerting_on('outcome="no_providers_available"')
    assert alerting_on("histogram_quantile(0.99", "edgeroute_gateway_overhead_seconds_bucket")
    assert alerting_on("histogram_quantile(0.99", "edgeroute_upstream_duration_seconds_bucket")
    assert alerting_on("edgeroute_records_dropped_total")
    assert alerting_on("edgeroute_failovers_total", "edgeroute_requests_total")
    assert alerting_on("edgeroute_in_flight_requests")
    assert alerting_on("sum by (route)", 'outcome=~"')  # error ratio by route
    breaker = next(r for r in _alert_rules() if r["alert"] == "EdgerouteBreakerOpen")
    assert breaker["for"].endswith("m")


# --- the compose fleet, rehearsed on loopback ----------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _http(
    method: str, url: str, body: Any = None, headers: Mapping[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        request.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            raw = response.read()
            status, reply_headers = response.status, dict(response.headers)
    except urllib.error.HTTPError as exc:
        raw, status, reply_headers = exc.read(), exc.code, dict(exc.headers)
    try:
        payload: Any = json.loads(raw)
    except ValueError:
        payload = raw.decode(errors="replace")
    return status, {k.lower(): v for k, v in reply_headers.items()}, payload


def _metric_sum(text: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith((name + "{", name + " "))
    )


class _Mock:
    def __init__(self, service: str, workdir: Path) -> None:
        command = [str(arg) for arg in _service(service)["command"]]
        self.compose_port = int(_option(command, "--port"))
        self.port = _free_port()
        command[command.index("--port") + 1] = str(self.port)
        command[command.index("--host") + 1] = HOST
        self.url = f"http://{HOST}:{self.port}"
        self._log = (workdir / f"{service}.log").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "edgeroute.cli", *command],
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().decode()
        assert "listening on" in line, (workdir / f"{service}.log").read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()


@pytest.mark.slow
def test_the_compose_fleet_rehearsed_on_loopback(redis_url: str, tmp_path: Path) -> None:
    """compose.yaml's commands and config, without Docker: three replicas on one Redis route,
    trip a breaker fleet-wide and fail over; the image and compose healthchecks pass."""
    mocks: dict[str, _Mock] = {}
    gateways: list[GatewayProcess] = []
    try:
        for service in MOCKS:
            mocks[service] = _Mock(service, tmp_path)
        for service, mock in mocks.items():
            mock_check = _healthcheck_argv(_service(service))
            mock_check[-1] = mock_check[-1].replace(f":{mock.compose_port}/", f":{mock.port}/")
            assert _run_healthcheck(mock_check) == 0

        document = yaml.safe_load(GATEWAY_CONFIG.read_text())
        for provider in document["providers"]:
            url = urlsplit(provider["base_url"])
            assert url.hostname is not None and url.port == mocks[url.hostname].compose_port
            provider["base_url"] = f"{mocks[url.hostname].url}{url.path}"
        document["state"]["key_prefix"] = f"compose-{uuid.uuid4().hex[:8]}"
        env = {**_gateway_env(), "EDGEROUTE_REDIS_URL": redis_url}
        for _ in GATEWAYS:
            gateways.append(GatewayProcess(document, tmp_path, port=_free_port(), env=env))
        for gateway in gateways:
            gateway.wait_ready()

        image_check = _healthcheck_command()
        compose_check = _healthcheck_argv(_service(GATEWAYS[0]))
        for gateway in gateways:
            # A first connection slower than the 50 ms state timeout (a loaded machine) is a
            # short degraded spell at startup; the replica must be live within seconds.
            deadline = time.monotonic() + 10.0
            while True:
                status, _, ready = _http("GET", f"{gateway.url}/readyz")
                if ready.get("shared_state") == "live" or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert status == 200 and ready["shared_state"] == "live", ready
            url = f"{gateway.url}/healthz"
            assert _run_healthcheck(image_check, {"EDGEROUTE_HEALTHCHECK_URL": url}) == 0
            argv = [*compose_check[:-1], compose_check[-1].replace(":8080/", f":{gateway.port}/")]
            assert _run_healthcheck(argv) == 0

        def ask(index: int, model: str) -> dict[str, str]:
            gateway = gateways[index % len(gateways)]  # what the load balancer does
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
            status, headers, payload = _http("POST", f"{gateway.url}/v1/chat/completions", body)
            assert status == 200, payload  # mock-flaky fails, the others never do: failover
            return headers

        chosen = {ask(i, "chat")["x-edgeroute-provider"] for i in range(12)}
        assert chosen <= set(MOCKS)
        cursor = {ask(i, "chat-rr")["x-edgeroute-provider"] for i in range(6)}
        assert len(cursor) >= 2  # one cursor for the fleet: the replicas take turns with it

        # mock-flaky goes down hard: its breaker opens for the whole fleet.
        status, _, _ = _http("POST", f"{mocks['mock-flaky'].url}/_mock/config", {"error_rate": 1})
        assert status == 200
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

        def flaky_breakers() -> set[str]:
            seen = set()
            for gateway in gateways:
                status, _, state = _http("GET", f"{gateway.url}/admin/state", headers=admin)
                assert status == 200, state
                (target,) = [
                    t
                    for t in state["routes"]["chat-rr"]["targets"]
                    if t["provider"] == "mock-flaky"
                ]
                seen.add(target["breaker"])
            return seen

        attempts = []
        for i in range(30):
            attempts.append(int(ask(i, "chat-rr")["x-edgeroute-attempts"]))
            if flaky_breakers() == {"open"}:
                break
        assert flaky_breakers() == {"open"}, "every replica sees the shared breaker open"
        assert max(attempts) >= 2  # requests that hit mock-flaky failed over
        for i in range(6):  # open breaker: mock-flaky is skipped, first attempts succeed
            assert ask(i, "chat-rr")["x-edgeroute-provider"] != "mock-flaky"

        failovers = 0.0
        for gateway in gateways:
            _, _, text = _http("GET", f"{gateway.url}/metrics")
            failovers += _metric_sum(text, "edgeroute_failovers_total")
        assert failovers >= 1

        for gateway in gateways:
            assert gateway.terminate(timeout=30) == 0  # SIGTERM drains and exits 0
    finally:
        for gateway in gateways:
            gateway.kill()
        for mock in mocks.values():
            mock.stop()


# --------------------------------------------------------------------------------------------
# ./dev, run against a stand-in Python that records what it is asked to do
# --------------------------------------------------------------------------------------------

# Plays `python3` and every venv's `bin/python`: `-m venv DIR` makes DIR/bin/python (this
# script again) and DIR/bin/edgeroute; anything else is logged, so no network, no pip.
_FAKE_PYTHON = """#!/usr/bin/env bash
echo "$0 $*" >> "$DEV_LOG"
if [ "$1 $2" = "-m venv" ]; then
  mkdir -p "$3/bin"
  cp "$FAKE_PYTHON" "$3/bin/python"
  printf '#!/usr/bin/env bash\\necho "$0 $*" >> "$DEV_LOG"\\n' > "$3/bin/edgeroute"
  chmod +x "$3/bin/python" "$3/bin/edgeroute"
fi
if [ "$1" = "-c" ]; then exit 1; fi  # "is edgeroute installed here?": no
exit 0
"""


def _run_dev(tmp_path: Path, *args: str) -> list[str]:
    work = tmp_path / "repo"
    work.mkdir(exist_ok=True)
    shutil.copy(ROOT / "dev", work / "dev")
    fake = tmp_path / "python3"
    fake.write_text(_FAKE_PYTHON)
    fake.chmod(0o755)
    log = tmp_path / "dev.log"
    log.write_text("")
    env = {**os.environ, "PYTHON": str(fake), "FAKE_PYTHON": str(fake), "DEV_LOG": str(log)}
    env.pop("EDGEROUTE_VENV", None)
    env.pop("EDGEROUTE_TEST_VENV", None)
    subprocess.run([str(work / "dev"), *args], cwd=work, env=env, check=True, timeout=60)
    return [line.replace(str(work) + "/", "") for line in log.read_text().splitlines()]


def test_dev_test_keeps_the_users_venv(tmp_path: Path) -> None:
    user_venv = tmp_path / "repo" / ".venv"
    user_venv.mkdir(parents=True)
    (user_venv / "something-i-installed").write_text("keep me")
    stale = tmp_path / "repo" / ".venv-test" / "stale"
    stale.parent.mkdir()
    stale.write_text("from an earlier run")
    calls = _run_dev(tmp_path, "test", "-k", "smoke")
    assert (user_venv / "something-i-installed").read_text() == "keep me"
    assert not stale.exists()  # the test venv is rebuilt from scratch
    assert any(c.endswith("-m venv .venv-test") for c in calls)
    assert calls[-1] == ".venv-test/bin/python -m pytest -q -k smoke"
    assert any(".venv-test/bin/python -m pip install --quiet -e .[test]" in c for c in calls)


def test_dev_demo_installs_the_openai_sdk_for_the_readme_snippet(tmp_path: Path) -> None:
    calls = _run_dev(tmp_path, "demo", "--port", "8181")
    assert any(c.endswith("-m pip install --quiet -e .[fast] openai") for c in calls), calls
    assert calls[-1] == ".venv/bin/edgeroute demo --port 8181"


def test_ci_runs_the_readme_test_command() -> None:
    assert (ROOT / ".ci" / "run").read_text().rstrip().endswith("exec ./dev test")
