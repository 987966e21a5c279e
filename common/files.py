"""Safe writes: a reader sees the old file (or directory) or the new one, never half of either,
and no command removes a directory it did not write.

- `atomic_write_text` / `atomic_write_json`: one file, written beside its target and renamed.
- `replace_dir`: a whole output directory (a model, a dataset, an export), built in a temporary
  directory beside it and swapped in. It refuses a non-empty directory that is not a previous
  output of the same command (an `OUTPUT_MARKER` file names the command) and never replaces `.`,
  the home directory, `/`, or a parent of the working directory, even when asked to overwrite.
- `check_output_dir`: the same refusal for outputs written in place (a feature cache).
- `exclusive_lock`: one process at a time through a section that fills a shared cache.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common.errors import OutputDirError, SpecRelayError

OUTPUT_MARKER = ".specrelay-output"  # holds the name of the command that wrote the directory

log = logging.getLogger(__name__)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write beside the target, then rename over it (atomic on POSIX within one filesystem)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, default=str))


@contextmanager
def exclusive_lock(path: str | Path, what: str) -> Iterator[None]:
    """Hold an advisory lock on file `path` (created if missing) for the body: a second process waits
    until the first is done, then sees what it left. The kernel drops the lock when its holder dies,
    so a killed process never leaves the cache locked."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process to finish %s (lock %s)", what, path)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def written_by(path: Path, kind: str, recognize: Sequence[str] = ()) -> bool:
    """Whether `path` holds a previous output of command `kind` (its marker, or a file only that
    command writes, for directories written before markers existed)."""
    marker = path / OUTPUT_MARKER
    if marker.is_file():
        return marker.read_text(encoding="utf-8").strip() == kind
    return any((path / name).exists() for name in recognize)


def _protected_reason(path: Path) -> str | None:
    """Why `path` must never be removed or replaced (None if it may be)."""
    real = path.resolve()
    cwd = Path.cwd().resolve()
    if real == Path(real.anchor):
        return "it is the filesystem root"
    if real == Path.home().resolve():
        return "it is your home directory"
    if real == cwd:
        return "it is the current directory"
    if cwd.is_relative_to(real):
        return f"it contains the current directory ({cwd})"
    return None


def check_output_dir(path: str | Path, kind: str, *, recognize: Sequence[str] = (), overwrite: bool = False,
                     hint: str = "choose another --output", what: str = "",
                     error: type[SpecRelayError] = OutputDirError, replace_own: bool = True) -> Path:
    """Raise `error` unless command `kind` may write `path`: it does not exist, is empty, or holds a
    previous output of `kind` (unless `replace_own` is off), or `overwrite` is set. `.`, home, `/`
    and parents of the working directory are refused whatever they hold. `what` names the output."""
    path = Path(path)
    what = what or f"an output of `{kind}`"
    if path.exists() or path.is_symlink():
        reason = _protected_reason(path)
        if reason:
            raise error(f"refusing to write {what} into {path}: {reason}, which this command would replace; "
                        f"give a new directory instead (e.g. out/{kind.split()[-1]})")
        if not path.is_dir():
            raise error(f"{path} exists and is not a directory; {hint}")
        if not overwrite and any(path.iterdir()) and not (replace_own and written_by(path, kind, recognize)):
            raise error(f"{path} is not empty and is not {what}; refusing to replace what it holds: {hint}")
    return path


def swap_in(tmp: Path, final: Path) -> None:
    """Move the finished directory `tmp` onto `final`: the old one is moved aside first and removed
    last, so `final` is never half-written and a crash leaves the old or the new one."""
    reason = _protected_reason(final) if final.exists() else None
    if reason:
        raise OutputDirError(f"refusing to replace {final}: {reason}")
    if os.path.ismount(final):
        raise OutputDirError(f"{final} is a mount point and cannot be replaced by a rename; "
                             "write into a subdirectory of it")
    old = None
    if final.exists() or final.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
        os.replace(final, old / "d")
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def new_temp_dir(final: Path) -> Path:
    """An empty directory beside `final` (same filesystem, so the final rename is atomic), with the
    permissions a plain mkdir would give (mkdtemp makes it private; outputs are not)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp.", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


@contextmanager
def replace_dir(path: str | Path, kind: str, *, recognize: Sequence[str] = (), overwrite: bool = False,
                hint: str = "choose another --output", what: str = "",
                error: type[SpecRelayError] = OutputDirError, replace_own: bool = True) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it replaces `path` (see check_output_dir for
    what is refused) and carries the marker of `kind`; on an error it is removed and `path` kept."""
    final = check_output_dir(path, kind, recognize=recognize, overwrite=overwrite, hint=hint, what=what,
                             error=error, replace_own=replace_own)
    tmp = new_temp_dir(final)
    try:
        yield tmp
        (tmp / OUTPUT_MARKER).write_text(kind + "\n", encoding="utf-8")
        swap_in(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
