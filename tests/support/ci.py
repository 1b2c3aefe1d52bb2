"""Are we in CI, and what a missing tool means there.

Locally a test that needs a system tool (nginx, promtool, openssl, faketime, …) skips when
it is absent; under CI (`CI=true`) `.ci/run` installs every one of them, so an absent tool
is a failure, never a silent skip. The only skips CI allows are what these machines cannot
run at all (a Docker engine; file permissions as root) — README's Development section names
each one.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def running_in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def missing(what: str, *, install: str = "") -> NoReturn:
    """Skip locally; fail under CI, saying how `.ci/run` should have provided it."""
    hint = f" ({install})" if install else ""
    if running_in_ci():
        pytest.fail(f"CI=true but {what} is missing{hint}", pytrace=False)
    pytest.skip(f"{what} is missing{hint}")
