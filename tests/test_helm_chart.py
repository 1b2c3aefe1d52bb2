"""The Helm chart in helm/edgeroute: lint it, render it, validate it, check what it promises.

Everything runs offline and in-process: `helm-python-sdk` embeds Helm's Go SDK (ctypes over a
bundled shared library, no helm binary, no network) and `kubernetes-validate` checks every
manifest against the Kubernetes JSON schemas it ships. The ServiceMonitor CRD is not among those
schemas, so its fields are checked by hand.

Rendered against the chart defaults and every value set in helm/examples/, with every secret
replaced by a sentinel that must show up in Secrets and nowhere else.
"""

from __future__ import annotations

import base64
import copy
import importlib
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from edgeroute.config import Config, loads_config
from tests.support.ci import running_in_ci


def _require(module: str) -> ModuleType:
    """Skip locally when a chart-testing package is missing; under CI that is a failure."""
    try:
        return importlib.import_module(module)
    except (ImportError, OSError) as exc:
        if running_in_ci():
            raise
        pytest.skip(
            f"{module} unavailable ({exc}): pip install -e '.[test]'", allow_module_level=True
        )


helm = _require("helm_python")
kubernetes_validate = _require("kubernetes_validate")

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "helm" / "edgeroute"
EXAMPLES = sorted((REPO / "helm" / "examples").glob("*.yaml"))
KUBE_VERSION = "1.30.0"
RELEASE = "gw"
NAMESPACE = "llm"
SENTINEL = "sk-test-SECRET-123"
# Stands in for the values of Secrets the chart does not create (existingSecret & co).
EXTERNAL_SECRET = "sk-test-SECRET-123-external"

Manifest = dict[str, Any]


def _load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


# Every install must name its image (none is published) and give at least one route.
IMAGE = "registry.example.com/team/edgeroute"
MINIMAL_CONFIG: dict[str, Any] = {
    "providers": [{"name": "openai", "base_url": "https://api.openai.com/v1"}],
    "routes": [{"model": "chat", "targets": [{"provider": "openai", "model": "gpt-4o-mini"}]}],
}

VALUE_SETS: dict[str, dict[str, Any]] = {
    # The chart's defaults plus the one required part of `config`.
    "default": {"config": MINIMAL_CONFIG},
    **{path.stem: _load_yaml(path) for path in EXAMPLES},
}


def with_secrets(values: dict[str, Any]) -> dict[str, Any]:
    """The value set with every secret the chart would store given as a sentinel (and the
    image every install names)."""
    values = copy.deepcopy(values)
    values.setdefault("image", {}).setdefault("repository", IMAGE)
    secret = values.setdefault("secret", {})
    secret["env"] = {name: f"{SENTINEL}-{name}" for name in secret.get("env") or {}}
    redis = values.get("redis") or {}
    external = redis.get("external") or {}
    if "password" in external:
        external["password"] = SENTINEL
    bundled = redis.get("bundled") or {}
    if bundled.get("enabled"):
        bundled.setdefault("auth", {})["password"] = SENTINEL
    return values


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chart() -> Iterator[Any]:
    with helm.Chart.load(str(CHART)) as loaded:
        yield loaded


class Rendered:
    """One `helm template`: the manifests, looked up by kind and name."""

    def __init__(self, files: dict[str, str]) -> None:
        self.files = files
        self.notes = next((text for path, text in files.items() if path.endswith("NOTES.txt")), "")
        self.manifests: list[Manifest] = [
            doc
            for path, text in sorted(files.items())
            if path.endswith((".yaml", ".yml"))
            for doc in yaml.safe_load_all(text)
            if doc
        ]

    def all(self, kind: str) -> list[Manifest]:
        return [m for m in self.manifests if m["kind"] == kind]

    def get(self, kind: str, name: str | None = None) -> Manifest:
        found = [m for m in self.all(kind) if name is None or m["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
        return found[0]

    @property
    def deployment(self) -> Manifest:
        return self.get("Deployment", f"{RELEASE}-edgeroute")

    @property
    def container(self) -> dict[str, Any]:
        containers = self.deployment["spec"]["template"]["spec"]["containers"]
        return next(c for c in containers if c["name"] == "edgeroute")

    @property
    def config_text(self) -> str:
        text = self.get("ConfigMap", f"{RELEASE}-edgeroute")["data"]["config.yaml"]
        assert isinstance(text, str)
        return text

    def secret_data(self) -> dict[str, dict[str, str]]:
        """Decoded data of every Secret the chart renders, by Secret name."""
        out: dict[str, dict[str, str]] = {}
        for secret in self.all("Secret"):
            data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
            data.update(secret.get("stringData") or {})
            out[secret["metadata"]["name"]] = data
        return out

    def container_env(self) -> dict[str, str]:
        """The environment the kubelet would give the gateway, $(VAR) references expanded."""
        secrets = self.secret_data()
        env: dict[str, str] = {}
        for var in self.container.get("env", []):
            if "value" in var:
                env[var["name"]] = _expand(var["value"], env)
                continue
            ref = var["valueFrom"]["secretKeyRef"]
            if ref["name"] in secrets:
                env[var["name"]] = secrets[ref["name"]][ref["key"]]
            else:
                env[var["name"]] = EXTERNAL_SECRET
        return env

    def config(self) -> Config:
        return loads_config(self.config_text, source="config.yaml", env=self.container_env())


def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' dependent-variable expansion: $(VAR) from earlier variables, $$ is $."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", substitute, value)


def with_required(values: dict[str, Any]) -> dict[str, Any]:
    """`values` plus what every install gives when the test does not: an image, a route."""
    values = copy.deepcopy(values)
    values.setdefault("image", {}).setdefault("repository", IMAGE)
    config = values.setdefault("config", {})
    if not values.get("configFile") and not config.get("routes"):
        config.setdefault("providers", MINIMAL_CONFIG["providers"])
        config["routes"] = MINIMAL_CONFIG["routes"]
    return values


def render(chart: Any, values: dict[str, Any], *, complete: bool = True) -> Rendered:
    """`helm template`; `complete` adds what with_required adds."""
    values = with_required(values) if complete else values
    files = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return Rendered(files)


def render_error(chart: Any, values: dict[str, Any], *, complete: bool = True) -> str:
    values = with_required(values) if complete else values
    with pytest.raises(helm.HelmError) as info:
        chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return str(info.value)


@pytest.fixture(scope="module", params=sorted(VALUE_SETS), ids=str)
def case(request: pytest.FixtureRequest, chart: Any) -> tuple[dict[str, Any], Rendered]:
    values = with_secrets(VALUE_SETS[request.param])
    return values, render(chart, values)


# --------------------------------------------------------------------------------------------
# Lint and schemas
# --------------------------------------------------------------------------------------------


def test_example_value_sets_cover_the_documented_setups() -> None:
    assert {
        "hpa",
        "redis-cluster-tls",
        "servicemonitor",
        "bundled-redis",
        "fleet-managed-redis",
    } <= set(VALUE_SETS)


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_lint_is_clean(name: str) -> None:
    report = helm.lint(
        str(CHART), with_secrets(VALUE_SETS[name]), strict=True, kube_version=f"v{KUBE_VERSION}"
    )
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


def test_manifests_match_kubernetes_schemas(case: tuple[dict[str, Any], Rendered]) -> None:
    _, rendered = case
    assert rendered.manifests
    for manifest in rendered.manifests:
        if manifest["kind"] == "ServiceMonitor":
            continue  # a CRD: checked field by field in test_service_monitor
        where = f"{manifest['kind']}/{manifest['metadata']['name']}"
        try:
            kubernetes_validate.validate(manifest, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{where} does not validate at {path}: {exc.message}")
        assert manifest["metadata"].get("namespace") == NAMESPACE, where


def test_values_schema_rejects_mistakes(chart: Any) -> None:
    for bad in (
        {"replicaCount": "3"},
        {"replicaCont": 3},
        {"config": {"state": {"redis_url": "redis://:hunter2@redis:6379/0"}}},
        {"redis": {"external": {"url": "redis://user:hunter2@redis:6379/0"}}},
        {"redis": {"external": {"url": "http://redis:6379"}}},
        {"secret": {"env": {"not-an-env-name": "x"}}},
        {"lifecycle": {"preStopMode": "signal"}},
        {"probes": {"readiness": {"path": "/other"}}},
    ):
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(bad)
    for values in VALUE_SETS.values():
        chart.validate_schema(with_secrets(values))


# --------------------------------------------------------------------------------------------
# The gateway's Deployment
# --------------------------------------------------------------------------------------------


def test_probes_and_graceful_drain(case: tuple[dict[str, Any], Rendered]) -> None:
    values, rendered = case
    container = rendered.container
    port = next(p for p in container["ports"] if p["name"] == "http")
    config = rendered.config()
    assert port["containerPort"] == config.server.port
    assert config.server.host in ("0.0.0.0", "::")
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"

    pre_stop = container["lifecycle"]["preStop"]
    if "exec" in pre_stop:
        assert pre_stop["exec"]["command"][0] == "sleep"
        sleep_s = int(pre_stop["exec"]["command"][1])
    else:
        sleep_s = pre_stop["sleep"]["seconds"]
    assert sleep_s == (values.get("lifecycle") or {}).get("preStopSleepSeconds", 10) > 0
    grace = rendered.deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > sleep_s + config.server.shutdown_timeout_s


def test_security_context_everywhere(case: tuple[dict[str, Any], Rendered]) -> None:
    _, rendered = case
    pods = [m["spec"]["template"]["spec"] for m in rendered.all("Deployment")]
    pods += [m["spec"] for m in rendered.all("Pod")]
    assert len(pods) >= 2  # the gateway and the helm test pod, at least
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["runAsNonRoot"] is True
            assert context["runAsUser"] != 0
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"]: v for v in rendered.deployment["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in rendered.container["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert mounts["/etc/edgeroute"]["readOnly"] is True
    assert volumes[mounts["/etc/edgeroute"]["name"]]["configMap"]["items"] == [
        {"key": "config.yaml", "path": "config.yaml"}
    ]


def test_resources_and_topology_spread(case: tuple[dict[str, Any], Rendered]) -> None:
    _, rendered = case
    assert rendered.container["resources"]["requests"]["memory"]
    pod = rendered.deployment["spec"]["template"]
    constraints = pod["spec"]["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in constraints} >= {"topology.kubernetes.io/zone"}
    for constraint in constraints:
        selector = constraint["labelSelector"]["matchLabels"]
        assert selector.items() <= pod["metadata"]["labels"].items()


def test_config_map_is_a_valid_edgeroute_config(case: tuple[dict[str, Any], Rendered]) -> None:
    values, rendered = case
    env = rendered.container_env()
    config = rendered.config()
    raw = yaml.safe_load(rendered.config_text)
    assert "redis_url" not in (raw.get("state") or {})
    # Provider keys come from the Secret through ${ENV}, exactly as given.
    for provider, raw_provider in zip(config.providers, raw.get("providers", []), strict=True):
        reference = re.fullmatch(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", raw_provider.get("api_key", ""))
        if reference:
            assert provider.api_key == env[reference.group(1)]
            assert provider.api_key.startswith(SENTINEL)
    expected_routes = ((values.get("config") or {}).get("routes")) or []
    assert [r.model for r in config.routes] == [r["model"] for r in expected_routes]


def test_redis_url_reaches_the_gateway(case: tuple[dict[str, Any], Rendered]) -> None:
    values, rendered = case
    env = rendered.container_env()
    config = rendered.config()
    redis = merged_redis(values)
    if not (redis["bundled"]["enabled"] or redis["external"]["url"]):
        assert "EDGEROUTE_REDIS_URL" not in env
        assert config.state.redis_url is None
        return
    url = env["EDGEROUTE_REDIS_URL"]
    assert config.state.redis_url == url  # EDGEROUTE_REDIS_URL wins over the file
    parts = urlsplit(url)
    if redis["bundled"]["enabled"]:
        assert parts.scheme == "redis"
        assert parts.hostname == f"{RELEASE}-edgeroute-redis"
        assert parts.password == SENTINEL
        return
    external = redis["external"]
    assert parts.scheme == urlsplit(external["url"]).scheme
    expected_password = EXTERNAL_SECRET if external.get("existingSecret") else SENTINEL
    assert parts.password == expected_password
    assert (parts.username or "") == external.get("username", "")
    # The password only ever travels through the Secret: the env var holds a reference.
    raw = next(v for v in rendered.container["env"] if v["name"] == "EDGEROUTE_REDIS_URL")
    assert "$(EDGEROUTE_REDIS_PASSWORD)" in raw["value"]
    query = parse_qs(parts.query)
    if external.get("sentinelAuth"):
        assert parts.scheme.endswith("+sentinel")
        assert query["sentinel_password"] == [expected_password]
    ca = (external.get("tls") or {}).get("caSecret")
    if ca:
        assert parts.scheme.startswith("rediss")
        ca_file = query["ssl_ca_certs"][0]
        mounts = {m["name"]: m["mountPath"] for m in rendered.container["volumeMounts"]}
        volumes = rendered.deployment["spec"]["template"]["spec"]["volumes"]
        volume = next(v for v in volumes if v.get("secret", {}).get("secretName") == ca)
        item = volume["secret"]["items"][0]["path"]
        assert ca_file == f"{mounts[volume['name']]}/{item}"


def test_redis_url_is_understood_by_the_gateway(case: tuple[dict[str, Any], Rendered]) -> None:
    topology = pytest.importorskip("edgeroute.state.topology")
    values, rendered = case
    config = rendered.config()
    url = config.state.redis_url
    if url is None:
        return
    # The CA file only exists inside the pod; everything else must parse as the gateway would.
    url = re.sub(r"[?&]ssl_ca_certs=[^&]*", "", url)
    target = topology.parse_state_url(url, cluster=config.state.cluster)
    env = rendered.container_env()
    assert target.password == env["EDGEROUTE_REDIS_PASSWORD"]
    scheme = url.partition("://")[0]
    if scheme.endswith("+sentinel"):
        assert target.kind == "sentinel" and target.master_name
        if merged_redis(values)["external"].get("sentinelAuth"):
            assert target.sentinel_password == target.password
    elif config.state.cluster or scheme.endswith("+cluster"):
        assert target.kind == "cluster"
    else:
        assert target.kind == "standalone"
    assert (target.ssl_context is not None) is scheme.startswith("rediss")


def merged_redis(values: dict[str, Any]) -> dict[str, Any]:
    redis = values.get("redis") or {}
    return {
        "bundled": {"enabled": False, **(redis.get("bundled") or {})},
        "external": {"url": "", **(redis.get("external") or {})},
    }


def test_secrets_stay_in_secrets(case: tuple[dict[str, Any], Rendered]) -> None:
    values, rendered = case
    encoded = base64.b64encode(SENTINEL.encode()).decode()[:16]
    for manifest in rendered.manifests:
        text = yaml.safe_dump(manifest)
        if manifest["kind"] == "Secret":
            continue
        where = f"{manifest['kind']}/{manifest['metadata']['name']}"
        assert SENTINEL not in text, f"a secret value leaked into {where}"
        assert encoded not in text, f"a base64 secret value leaked into {where}"
    stored = [v for data in rendered.secret_data().values() for v in data.values()]
    secret = values.get("secret") or {}
    if secret.get("env") and not secret.get("existingSecret"):
        assert {f"{SENTINEL}-{name}" for name in secret["env"]} <= set(stored)


def test_checksum_annotation_follows_config_and_secret(chart: Any) -> None:
    base = with_secrets(VALUE_SETS["fleet-managed-redis"])

    def annotations(values: dict[str, Any]) -> dict[str, str]:
        result: dict[str, str] = render(chart, values).deployment["spec"]["template"]["metadata"][
            "annotations"
        ]
        return result

    first = annotations(base)
    assert re.fullmatch(r"[0-9a-f]{64}", first["checksum/config"])
    assert annotations(base) == first  # stable: an unchanged config does not roll the pods

    changed_config = copy.deepcopy(base)
    changed_config["config"]["breaker"]["failure_threshold"] = 5
    after = annotations(changed_config)
    assert after["checksum/config"] != first["checksum/config"]
    assert after["checksum/secret"] == first["checksum/secret"]

    rotated = copy.deepcopy(base)
    rotated["secret"]["env"]["OPENAI_API_KEY"] = f"{SENTINEL}-rotated"
    after = annotations(rotated)
    assert after["checksum/secret"] != first["checksum/secret"]
    assert after["checksum/config"] == first["checksum/config"]


# --------------------------------------------------------------------------------------------
# Replicas: HPA and PDB
# --------------------------------------------------------------------------------------------


def test_hpa_owns_the_replica_count(case: tuple[dict[str, Any], Rendered]) -> None:
    values, rendered = case
    autoscaling = values.get("autoscaling") or {}
    if autoscaling.get("enabled"):
        assert "replicas" not in rendered.deployment["spec"]
        hpa = rendered.get("HorizontalPodAutoscaler")
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": rendered.deployment["metadata"]["name"],
        }
        assert hpa["spec"]["minReplicas"] == autoscaling["minReplicas"]
        assert hpa["spec"]["maxReplicas"] == autoscaling["maxReplicas"]
    else:
        assert rendered.deployment["spec"]["replicas"] == values.get("replicaCount", 1)
        assert rendered.all("HorizontalPodAutoscaler") == []


@pytest.mark.parametrize(
    ("values", "expect_pdb"),
    [
        ({}, False),
        ({"replicaCount": 1}, False),
        ({"replicaCount": 2}, True),
        ({"replicaCount": 3, "podDisruptionBudget": {"enabled": False}}, False),
        ({"autoscaling": {"enabled": True, "minReplicas": 1}}, False),
        ({"autoscaling": {"enabled": True, "minReplicas": 2}}, True),
        ({"replicaCount": 5, "autoscaling": {"enabled": True, "minReplicas": 1}}, False),
        ({"replicaCount": 1, "autoscaling": {"enabled": True, "minReplicas": 3}}, True),
    ],
)
def test_pdb_only_with_more_than_one_replica(
    chart: Any, values: dict[str, Any], expect_pdb: bool
) -> None:
    rendered = render(chart, values)
    pdbs = rendered.all("PodDisruptionBudget")
    assert bool(pdbs) is expect_pdb
    if pdbs:
        selector = pdbs[0]["spec"]["selector"]["matchLabels"]
        assert selector == rendered.deployment["spec"]["selector"]["matchLabels"]
        assert pdbs[0]["spec"]["maxUnavailable"] == 1


def test_pdb_matches_each_value_set(case: tuple[dict[str, Any], Rendered]) -> None:
    values, rendered = case
    autoscaling = values.get("autoscaling") or {}
    if autoscaling.get("enabled"):
        replicas = autoscaling.get("minReplicas", 2)
    else:
        replicas = values.get("replicaCount", 1)
    assert bool(rendered.all("PodDisruptionBudget")) is (replicas > 1)


# --------------------------------------------------------------------------------------------
# Service, ServiceMonitor, helm test, bundled Redis, NOTES
# --------------------------------------------------------------------------------------------


def test_service_selects_only_the_gateway(case: tuple[dict[str, Any], Rendered]) -> None:
    _, rendered = case
    service = rendered.get("Service", f"{RELEASE}-edgeroute")
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    selector = service["spec"]["selector"].items()
    for deployment in rendered.all("Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"].items()
        assert (selector <= labels) is (deployment is rendered.deployment)


def test_service_monitor(case: tuple[dict[str, Any], Rendered]) -> None:
    values, rendered = case
    monitors = rendered.all("ServiceMonitor")
    if not (values.get("serviceMonitor") or {}).get("enabled"):
        assert monitors == []
        return
    (monitor,) = monitors
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(monitor["spec"]) <= {"namespaceSelector", "selector", "endpoints", "jobLabel"}
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    service = rendered.get("Service", f"{RELEASE}-edgeroute")
    selector = monitor["spec"]["selector"]["matchLabels"].items()
    for candidate in rendered.all("Service"):  # the gateway's Service, and only that one
        assert (selector <= candidate["metadata"]["labels"].items()) is (candidate is service)
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"]
    assert endpoint["path"] == "/metrics"
    for duration in ("interval", "scrapeTimeout"):
        assert re.fullmatch(r"[0-9]+(ms|s|m|h)", endpoint[duration])
    for key, value in (values["serviceMonitor"].get("labels") or {}).items():
        assert monitor["metadata"]["labels"][key] == value
    for relabel in endpoint.get("metricRelabelings", []):
        assert relabel.get("action", "replace") in {"keep", "drop", "replace", "labeldrop"}


def test_helm_test_pod_calls_readyz(case: tuple[dict[str, Any], Rendered]) -> None:
    _, rendered = case
    (pod,) = rendered.all("Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    service = rendered.get("Service", f"{RELEASE}-edgeroute")
    command = pod["spec"]["containers"][0]["command"]
    url = urlsplit(command[-1])
    assert url.hostname == f"{service['metadata']['name']}.{NAMESPACE}.svc"
    assert url.port == service["spec"]["ports"][0]["port"]
    assert url.path == "/readyz"


def test_bundled_redis(chart: Any) -> None:
    values = {
        "replicaCount": 2,
        "redis": {"bundled": {"enabled": True}},
        "serviceMonitor": {"enabled": True},
    }
    rendered = render(chart, values)
    test_service_monitor((values, rendered))
    test_service_selects_only_the_gateway((values, rendered))
    redis = rendered.get("Deployment", f"{RELEASE}-edgeroute-redis")
    service = rendered.get("Service", f"{RELEASE}-edgeroute-redis")
    assert (
        service["spec"]["selector"].items()
        <= redis["spec"]["template"]["metadata"]["labels"].items()
    )
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    # No password given: one is generated, kept in the Secret only, and both sides agree.
    password = rendered.secret_data()[f"{RELEASE}-edgeroute"]["redis-password"]
    assert len(password) >= 24
    env = rendered.container_env()
    assert urlsplit(env["EDGEROUTE_REDIS_URL"]).password == password
    for manifest in rendered.manifests:
        if manifest["kind"] != "Secret":
            assert password not in yaml.safe_dump(manifest)
    # Without auth there is neither a password nor a Secret.
    rendered = render(chart, {"redis": {"bundled": {"enabled": True, "auth": {"enabled": False}}}})
    assert rendered.all("Secret") == []
    assert rendered.container_env()["EDGEROUTE_REDIS_URL"] == (
        f"redis://{RELEASE}-edgeroute-redis:6379/0"
    )


def test_notes_warn_about_a_fleet_without_redis(chart: Any) -> None:
    assert "WARNING" in render(chart, {"replicaCount": 3}).notes
    assert "WARNING" not in render(chart, {"replicaCount": 1}).notes
    notes = render(chart, with_secrets(VALUE_SETS["fleet-managed-redis"])).notes
    assert "WARNING" not in notes and "/v1" in notes


# --------------------------------------------------------------------------------------------
# What the chart refuses to render
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"lifecycle": {"preStopSleepSeconds": 10, "terminationGracePeriodSeconds": 30}},
            "terminationGracePeriodSeconds",
        ),
        (
            {
                "config": {
                    "providers": [
                        {"name": "openai", "base_url": "https://x/v1", "api_key": SENTINEL}
                    ]
                },
                "secret": {"env": {"OPENAI_API_KEY": SENTINEL}},
            },
            "secret.env.OPENAI_API_KEY",
        ),
        ({"secret": {"env": {"OPENAI_API_KEY": ""}}}, "secret.env.OPENAI_API_KEY is empty"),
        (
            {"redis": {"external": {"url": "redis://redis:6379/0", "password": "a/b?c#d"}}},
            "redis.external.password",
        ),
        (
            {"redis": {"external": {"url": "redis://r:6379", "tls": {"caSecret": "ca"}}}},
            "rediss://",
        ),
        (
            {"podDisruptionBudget": {"minAvailable": 1, "maxUnavailable": 1}, "replicaCount": 2},
            "only one of",
        ),
        ({"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}, "minReplicas"),
        (
            {"redis": {"external": {"url": "redis://r:6379/0", "sentinelAuth": True}}},
            "sentinelAuth",
        ),
    ],
)
def test_render_refuses(chart: Any, values: dict[str, Any], message: str) -> None:
    assert message in render_error(chart, values)


def test_existing_secret_is_used_as_is(chart: Any) -> None:
    rendered = render(
        chart,
        {
            "secret": {"existingSecret": "keys", "env": {"OPENAI_API_KEY": ""}},
            "redis": {"external": {"url": "redis://r:6379/0", "existingSecret": "redis-auth"}},
        },
    )
    assert rendered.all("Secret") == []
    refs = {
        v["name"]: v["valueFrom"]["secretKeyRef"]
        for v in rendered.container["env"]
        if "valueFrom" in v
    }
    assert refs["OPENAI_API_KEY"] == {"name": "keys", "key": "OPENAI_API_KEY"}
    assert refs["EDGEROUTE_REDIS_PASSWORD"] == {"name": "redis-auth", "key": "redis-password"}
    assert (
        "checksum/secret" not in rendered.deployment["spec"]["template"]["metadata"]["annotations"]
    )


def test_redis_url_from_a_secret(chart: Any) -> None:
    rendered = render(
        chart, {"redis": {"external": {"urlSecret": {"name": "redis-url", "key": "url"}}}}
    )
    (var,) = [v for v in rendered.container["env"] if v["name"] == "EDGEROUTE_REDIS_URL"]
    assert var["valueFrom"]["secretKeyRef"] == {"name": "redis-url", "key": "url"}
    assert not any(v["name"] == "EDGEROUTE_REDIS_PASSWORD" for v in rendered.container["env"])


def test_termination_grace_follows_the_drain_window(chart: Any) -> None:
    rendered = render(
        chart,
        {
            "config": {"server": {"shutdown_timeout_s": 42.5}},
            "lifecycle": {"preStopSleepSeconds": 7},
        },
    )
    spec = rendered.deployment["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] == 7 + 43 + 10
    rendered = render(chart, {"lifecycle": {"preStopMode": "sleep", "preStopSleepSeconds": 3}})
    assert rendered.container["lifecycle"]["preStop"] == {"sleep": {"seconds": 3}}
    kubernetes_validate.validate(rendered.deployment, KUBE_VERSION, strict=True)


# --------------------------------------------------------------------------------------------
# Documentation
# --------------------------------------------------------------------------------------------

# Free-form values (Kubernetes objects, the edgeroute config): documented as a whole.
_OPAQUE = {
    "config",
    "resources",
    "podSecurityContext",
    "securityContext",
    "strategy",
    "autoscaling.behavior",
    "redis.bundled.resources",
}


def _value_paths(node: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(node, dict) and node and prefix not in _OPAQUE:
        for key, child in node.items():
            yield from _value_paths(child, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix


def test_every_value_is_documented() -> None:
    readme = (CHART / "README.md").read_text(encoding="utf-8")
    readme = readme.split("\n## Values\n", 1)[1].split("\n## ", 1)[0]
    table = {m.group(1) for m in re.finditer(r"^\| `([^`]+)` \|", readme, re.MULTILINE)}
    paths = set(_value_paths(_load_yaml(CHART / "values.yaml")))
    assert paths - table == set(), "values missing from the README table"
    unknown = {row for row in table - paths if not any(row.startswith(f"{o}.") for o in _OPAQUE)}
    assert unknown == set(), "README documents values that do not exist"


# --------------------------------------------------------------------------------------------
# The first install: what must be given, a local config file, the documented commands
# --------------------------------------------------------------------------------------------


def test_chart_defaults_say_what_is_missing(chart: Any) -> None:
    message = render_error(chart, {}, complete=False)
    assert "image.repository is not set: no edgeroute image is published" in message
    assert "docker build" in message and "--set image.repository=" in message
    message = render_error(chart, {"image": {"repository": IMAGE}}, complete=False)
    assert "no routes" in message and "--set-file configFile=edgeroute.yaml" in message


@pytest.mark.parametrize("example", ["openai.yaml", "openai-anthropic.yaml"])
def test_a_local_config_file_is_used_as_is(chart: Any, example: str) -> None:
    text = (REPO / "examples" / example).read_text(encoding="utf-8")
    names = sorted(set(re.findall(r"\$\{([A-Z_]+)\}", text)))
    values = {
        "configFile": text,
        "config": {"routes": [{"model": "ignored", "targets": []}]},  # configFile wins
        "secret": {"env": {name: f"{SENTINEL}-{name}" for name in names}},
    }
    rendered = render(chart, values)
    config = rendered.config()
    local = loads_config(text, env={name: "x" for name in names})
    assert [r.model for r in config.routes] == [r.model for r in local.routes]
    assert config.server.host == "0.0.0.0"  # the file says 127.0.0.1: unreachable in a pod
    assert config.server.port == local.server.port
    for provider in config.providers:
        assert provider.api_key is not None and provider.api_key.startswith(SENTINEL)
    assert "Models (routes): " + ", ".join(r.model for r in local.routes) in rendered.notes


def test_a_config_file_sets_the_port_and_keeps_its_own_host(chart: Any) -> None:
    text = (REPO / "examples" / "openai.yaml").read_text(encoding="utf-8")
    text = text.replace("host: 127.0.0.1", "host: '::'").replace("port: 8080", "port: 9000")
    rendered = render(chart, {"configFile": text, "secret": {"env": {"OPENAI_API_KEY": "sk-1"}}})
    assert rendered.config().server.host == "::"
    assert {p["containerPort"] for p in rendered.container["ports"]} == {9000}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("state: {redis_url: 'redis://:pw@r:6379'}\n", "configFile: state.redis_url: do not set"),
        ("- a list\n", "configFile is not a YAML mapping"),
        ("server: {port: 8080}\n", "no routes"),
    ],
)
def test_a_config_file_is_refused_with_a_reason(chart: Any, text: str, message: str) -> None:
    assert message in render_error(chart, {"configFile": text})


def _documented_install_commands() -> list[tuple[str, str]]:
    """Every `helm install`/`helm upgrade --install` in README.md, docs/deployment.md and the
    chart README."""
    commands = []
    for readme in (REPO / "README.md", REPO / "docs" / "deployment.md", CHART / "README.md"):
        text = readme.read_text(encoding="utf-8")
        for block in re.findall(r"```sh\n(.*?)```", text, re.S):
            for line in block.replace("\\\n", " ").splitlines():
                if re.match(r"\s*helm (upgrade --install|install) ", line):
                    where = str(readme.relative_to(REPO))
                    commands.append((where, line.split(" #", 1)[0].strip()))
    return commands


def _shell_value(word: str) -> str:
    """A documented command's `$VAR` / `$(cmd)` as a plausible value (secrets as sentinels)."""
    known = {"REGISTRY": "registry.example.com/team", "TAG": "0.1.0"}

    def substitute(match: re.Match[str]) -> str:
        name = match.group(2) or ""
        return known.get(name, f"{SENTINEL}-doc-{name or 'generated'}")

    return re.sub(r"\$\(([^)]*)\)|\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", substitute, word)


def _values_from_command(command: str) -> dict[str, Any]:
    """The values a helm command line gives: -f files, then --set/--set-string/--set-file."""
    import shlex

    words = [_shell_value(w) for w in shlex.split(command)]
    values: dict[str, Any] = {}
    i = 0
    while i < len(words):
        word = words[i]
        if word in ("-f", "--values"):
            values = _merge(values, _load_yaml(REPO / words[i + 1]))
        elif word in ("--set", "--set-string", "--set-file"):
            key, _, value = words[i + 1].partition("=")
            if word == "--set-file":
                value = (REPO / value).read_text(encoding="utf-8")
            node = values
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        else:
            i += 1
            continue
        i += 2
    return values


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def test_readmes_have_install_commands() -> None:
    documents = {name for name, _ in _documented_install_commands()}
    assert documents == {"README.md", "docs/deployment.md", "helm/edgeroute/README.md"}
    assert len(_documented_install_commands()) >= 3


@pytest.mark.parametrize(
    "command", [c for _, c in _documented_install_commands()], ids=lambda c: c[:60]
)
def test_documented_install_commands_render(chart: Any, command: str) -> None:
    # Exactly what the docs say, nothing added: it must render, and the gateway must load it.
    rendered = render(chart, _values_from_command(command), complete=False)
    config = rendered.config()
    assert config.routes
    assert config.server.host in ("0.0.0.0", "::")
    assert rendered.container["image"].startswith("registry.example.com/team/edgeroute:")
