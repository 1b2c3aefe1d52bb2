"""Find the Lua scripts (installed wheel or source checkout) and compose them with lib.lua."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

SCRIPT_NAMES = ("decide", "record", "reset")
# Scripts on keys of their own, not a route's: they run without lib.lua.
STANDALONE_NAMES = ("client",)


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: str
    sha: str


def _read(name: str) -> str:
    # In a wheel the scripts travel inside the package; an editable install reads the checkout.
    packaged = resources.files("edgeroute").joinpath("lua", f"{name}.lua")
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    checkout = Path(__file__).resolve().parents[2] / "lua" / f"{name}.lua"
    if checkout.is_file():
        return checkout.read_text(encoding="utf-8")
    raise FileNotFoundError(f"edgeroute Lua script {name}.lua is missing from the installation")


@cache
def load_scripts() -> dict[str, Script]:
    """Each script is lib.lua followed by its own body; the SHA is computed locally."""
    lib = _read("lib")
    scripts = {}
    for name in SCRIPT_NAMES:
        source = f"{lib}\n-- ---- {name}.lua ----\n{_read(name)}"
        scripts[name] = Script(name, source, hashlib.sha1(source.encode()).hexdigest())
    for name in STANDALONE_NAMES:
        source = _read(name)
        scripts[name] = Script(name, source, hashlib.sha1(source.encode()).hexdigest())
    return scripts
