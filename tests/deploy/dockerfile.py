"""A small Dockerfile / .dockerignore reader for the tests (instructions, COPY sources, ignore rules)."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Instruction:
    line: int
    cmd: str           # upper-case: FROM, COPY, RUN ...
    args: str          # the raw rest of the line, continuations joined
    flags: dict        # --chmod=0755 etc. (COPY/ADD/HEALTHCHECK)

    def words(self) -> list[str]:
        """Arguments as a list: JSON (exec) form or shell-split form, flags removed."""
        rest = self.args
        if rest.lstrip().startswith("["):
            return json.loads(rest)
        return [w for w in shlex.split(rest) if not w.startswith("--")]


def parse(path: Path) -> list[Instruction]:
    out: list[Instruction] = []
    buf, start = "", 0
    for i, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # comment lines inside a continuation are dropped by Docker too
        if not buf:
            start = i
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        cmd, _, rest = buf.partition(" ")
        flags = {}
        rest = rest.strip()
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            k, _, v = flag[2:].partition("=")
            flags[k] = v
            rest = rest.strip()
        out.append(Instruction(start, cmd.upper(), rest, flags))
        buf = ""
    return out


def healthcheck_cmd(ins: Instruction) -> list[str]:
    """The command of `HEALTHCHECK [opts] CMD ...`."""
    assert ins.args.startswith("CMD"), ins.args
    rest = ins.args[3:].strip()
    return json.loads(rest) if rest.startswith("[") else shlex.split(rest)


def _pattern_regex(pattern: str) -> re.Pattern:
    # Docker (moby/patternmatcher): '**' any number of directories, '*' and '?' within one segment.
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + "$")


def dockerignore_excludes(ignore_file: Path, relpath: str) -> bool:
    """True if `relpath` (or a parent directory of it) is excluded from the build context."""
    rules = []
    for line in ignore_file.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pat = line[1:] if negate else line
        rules.append((negate, _pattern_regex(pat.strip("/"))))
    parts = relpath.strip("/").split("/")
    prefixes = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    excluded = False
    for negate, rx in rules:  # the last matching rule wins
        if any(rx.match(p) for p in prefixes):
            excluded = not negate
    return excluded
