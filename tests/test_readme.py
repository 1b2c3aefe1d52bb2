"""Every ```python block in README.md runs (except those tagged `notest`, which need a
running gateway), so the documented API is the one that works."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def python_blocks() -> list[str]:
    return BLOCK.findall(README.read_text())


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_example_runs(index: int, redis_url: str, tmp_path: Path) -> None:
    source = python_blocks()[index]
    script = tmp_path / f"readme_{index}.py"
    script.write_text(source)
    env = {**os.environ, "EDGEROUTE_REDIS_URL": redis_url}
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_readme_has_runnable_examples() -> None:
    assert len(python_blocks()) >= 4


def test_readme_documents_every_mock_setting() -> None:
    from edgeroute.mock_provider import FAULTS, MockSettings

    text = README.read_text()
    table = text.split("/_mock/config", 1)[1].split("## Endpoints", 1)[0]
    for field in MockSettings.__struct_fields__:
        assert f"`{field}`" in table, field
    for fault in FAULTS:
        assert f"`{fault}`" in table, fault


def test_readme_shows_the_first_hour_commands() -> None:
    text = README.read_text()
    for command in (
        "edgeroute serve --model gpt-4o-mini --model claude-3-5-haiku-latest",
        "examples/openai.yaml",
        "examples/openai-anthropic.yaml",
        "check --config FILE [--connect]",
        "--set-file configFile=",
    ):
        assert command in text, command


def test_traffic_policy_examples_are_valid_configs() -> None:
    import yaml

    from edgeroute.config import parse_config

    text = README.read_text()
    section = text.split("## Traffic policies", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```yaml\n(.*?)```", section, re.S)
    assert len(blocks) == 4
    for block in blocks:
        document = yaml.safe_load(block)
        names = {t["provider"] for r in document["routes"] for t in r["targets"]}
        document["providers"] = [
            {"name": name, "base_url": "https://example.invalid/v1"} for name in sorted(names)
        ]
        parse_config(document, env={})
