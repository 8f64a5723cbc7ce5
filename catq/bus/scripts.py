"""The Lua scripts of the Bus, one a file under ``lua/``: a header of ``--`` lines (what the
script does, its KEYS and ARGV), then the script Redis runs, sent as it stands in the file.

The header is cut off before the script is sent: the text Redis runs (and its EVALSHA digest)
is the body alone, and a body may start with a ``#!lua`` flag line, which must come first.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

SCRIPTS = ("complete", "screen", "publish_traced", "replay", "publish_once", "trim",
           "lease_acquire", "lease_renew", "lease_release", "fenced_publish", "rate_limit")


@cache
def lua(name: str) -> str:
    """The body of ``lua/<name>.lua``: the file without its leading ``--`` header lines."""
    source = files("catq.bus").joinpath("lua", f"{name}.lua").read_bytes().decode("utf-8")
    lines = source.splitlines(keepends=True)
    header = 0
    while header < len(lines) and lines[header].startswith("--"):
        header += 1
    return "".join(lines[header:])
