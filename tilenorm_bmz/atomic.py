"""Outputs that appear whole or not at all: temporary siblings, publishing, stale leftovers, writability.

Every file or folder tilenorm-bmz writes for a user (checkpoints, packages, predictions, reports) is first
written under a hidden sibling name ``.NAME.tilenorm-tmp-HOST-PID-HEX`` in the same folder and then
renamed into place (:func:`publish`), so an interrupted run never leaves a half-written ``NAME``:

* on an exception, and on SIGTERM (the CLI turns it into ``SystemExit``, :func:`exit_on_sigterm`), the
  writer removes its temporary sibling;
* after SIGKILL or a power cut the sibling stays; the next run that writes ``NAME`` removes siblings whose
  process (on this host) is gone (:func:`remove_stale`);
* published files get the mode a plain ``open()`` would give them (``0o666`` less the umask, typically
  ``0644``), not the ``0600`` of ``mkstemp``: packages and checkpoints are meant to be shared.

:func:`check_writable` lets a command refuse an output it could not write *before* any work starts.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import uuid
from pathlib import Path
from typing import Any

from .errors import TilenormError

__all__ = ["TMP_TAG", "OutputError", "check_writable", "exit_on_sigterm", "publish", "remove_stale",
           "shared_mode", "temp_sibling"]

TMP_TAG = "tilenorm-tmp"


class OutputError(TilenormError, ValueError):
    """An output cannot be written where the user asked (exists, read-only folder, parent is a file)."""


def _host() -> str:
    return "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:32] or "host"


def temp_sibling(path: str | os.PathLike[str], suffix: str = "") -> Path:
    """A fresh hidden temporary name next to ``path`` (same folder, so the final rename is atomic)."""
    p = Path(path)
    return p.parent / f".{p.name}.{TMP_TAG}-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}"


def shared_mode(directory: bool = False) -> int:
    """The mode ``open()`` / ``mkdir()`` would give a new file / folder under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def publish(tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Give ``tmp`` the shared mode and rename it to ``path`` (atomic on one file system)."""
    tmp_p, out = Path(tmp), Path(path)
    if tmp_p.is_file():
        os.chmod(tmp_p, shared_mode())
    elif tmp_p.is_dir():
        os.chmod(tmp_p, shared_mode(directory=True))
    os.replace(tmp_p, out)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale(path: str | os.PathLike[str]) -> list[Path]:
    """Remove temporary siblings of ``path`` left by runs of this host whose process is gone; returns them."""
    p = Path(path)
    if not p.parent.is_dir():
        return []
    removed = []
    prefix = f".{p.name}.{TMP_TAG}-{_host()}-"
    for candidate in p.parent.glob(f".{p.name}.{TMP_TAG}-*"):
        name = candidate.name
        if not name.startswith(prefix):
            continue  # another host's run (shared storage): not ours to judge
        pid_text = name[len(prefix):].split("-", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid() or _alive(int(pid_text)):
            continue
        if candidate.is_dir() and not candidate.is_symlink():
            shutil.rmtree(candidate, ignore_errors=True)
        else:
            candidate.unlink(missing_ok=True)
        removed.append(candidate)
    return removed


def check_writable(path: str | os.PathLike[str], *, overwrite: bool = False, folder: bool = False,
                   option: str = "--output") -> Path:
    """Refuse, before any work, an output that cannot be written.

    ``folder``: ``path`` is a folder the command writes files into (existing folders are fine). Otherwise
    ``path`` must not exist unless ``overwrite``. Its nearest existing ancestor must be a writable folder.
    """
    p = Path(path)
    if p.exists():
        if folder:
            if not p.is_dir():
                raise OutputError(f"{option} {p} is a file, not a folder: choose a folder")
            if not os.access(p, os.W_OK | os.X_OK):
                raise OutputError(f"{option} {p} is not writable: choose another folder")
            return p
        if not overwrite:
            raise OutputError(f"{p} exists; choose another output or pass --overwrite")
    ancestor = p.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"{option} {p}: {ancestor} is a file, so nothing can be written below it")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {p}: the folder {ancestor} is not writable; choose another location")
    return p


def exit_on_sigterm() -> Any:
    """Turn SIGTERM into ``SystemExit(143)`` in the main thread, so writers clean their temporary outputs as on
    any other exception. Returns the previous handler."""
    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, handler)

