"""Chart values for live operations: `config.reload` and the Grafana dashboard ConfigMap."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import yaml

from tests.test_helm_chart import (
    CHART,
    VALUE_SETS,
    chart,  # noqa: F401  (the module-scoped fixture)
    helm,
    render,
    with_secrets,
)

BASE = "fleet-managed-redis"


def _with(values: dict[str, Any], **config: Any) -> dict[str, Any]:
    result = copy.deepcopy(with_secrets(VALUE_SETS[BASE]))
    result.setdefault("config", {}).update(config)
    result.update(values)
    return result


def test_reload_restart_rolls_pods_and_signal_reloads_in_place(chart: Any) -> None:  # noqa: F811
    restart = render(chart, _with({}))
    annotations = restart.deployment["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/config" in annotations
    assert restart.container_env()["EDGEROUTE_CONFIG_WATCH_S"] == "0"

    signal = render(chart, _with({}, reload="signal"))
    annotations = signal.deployment["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/config" not in annotations  # a ConfigMap change does not roll the pods
    assert "checksum/secret" in annotations  # secrets are env vars: those still do
    assert signal.container_env()["EDGEROUTE_CONFIG_WATCH_S"] == "5"
    # `reload` is the chart's, not edgeroute's: the gateway would refuse an unknown field.
    assert "reload" not in yaml.safe_load(signal.config_text)
    signal.config()  # edgeroute loads the rendered config
    # The config is mounted as a whole ConfigMap volume (no subPath): the kubelet updates it.
    mounts = signal.container["volumeMounts"]
    assert all("subPath" not in m for m in mounts)

    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(_with({}, reload="sometimes"))


def test_dashboard_config_map_for_the_grafana_sidecar(chart: Any) -> None:  # noqa: F811
    assert not [
        m
        for m in render(chart, _with({})).all("ConfigMap")
        if m["metadata"]["name"].endswith("-dashboard")
    ]
    values = _with(
        {"grafana": {"dashboard": {"enabled": True, "annotations": {"grafana_folder": "LLM"}}}}
    )
    rendered = render(chart, values)
    (config_map,) = [
        m for m in rendered.all("ConfigMap") if m["metadata"]["name"].endswith("-dashboard")
    ]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "LLM"}
    shipped = json.loads(config_map["data"]["edgeroute.json"])
    assert shipped == json.loads((CHART / "dashboards" / "edgeroute.json").read_text())
