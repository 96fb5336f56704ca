"""Integrity of bioimage.io packages from strangers: safe member names, bounded sizes, sha256, lazy reading.

Every command that reads a package opens it through :func:`open_package`, which refuses (``IntegrityError``)
before anything else happens:

* zip members (or, for an unpacked folder, files) whose name is absolute, has a drive letter, contains
  ``..``, or that are symbolic links;
* zip members larger than :attr:`ArchiveLimits.max_member_bytes`, archives whose members add up to more
  than :attr:`ArchiveLimits.max_total_bytes`, and members that expand more than
  :attr:`ArchiveLimits.max_ratio` times (a "zip bomb"; checked for members of at least
  :attr:`ArchiveLimits.ratio_floor_bytes`, since small test tensors of zeros compress well legitimately);
* any local file the description names with a ``sha256`` (format 0.5 file descriptions, format 0.4
  ``weights.*.sha256`` and ``architecture_sha256``) whose content does not match it, or that is missing.

Members are read lazily: :meth:`PackageFiles.file` extracts one member when a loader asks for it, hashes
are computed from the compressed stream, and only :meth:`PackageFiles.root` (used to copy a whole package)
extracts everything. The source is never modified.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from ..errors import IntegrityError
from ..foreign import RDF_NAMES
from ._yaml import load_yaml

__all__ = ["ArchiveLimits", "PackageFiles", "named_files", "open_package"]

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20


@dataclass(frozen=True)
class ArchiveLimits:
    """Bounds on what a package may make us read or write (defaults fit the largest zoo models)."""

    max_member_bytes: int = 4 * 2**30
    """Largest uncompressed member."""
    max_total_bytes: int = 16 * 2**30
    """Largest sum of uncompressed members."""
    max_ratio: float = 200.0
    """Largest uncompressed / compressed size of one member (weights compress about 1.1x, noise-free test
    tensors rarely beyond 50x)."""
    ratio_floor_bytes: int = 16 * 2**20
    """Members smaller than this are not held to ``max_ratio``."""


def _unsafe_name(name: str) -> str | None:
    """Why a member name is unsafe (None when it is fine)."""
    if "\\" in name:
        return "it contains a backslash"
    p = PurePosixPath(name)
    if p.is_absolute() or name.startswith("/"):
        return "it is an absolute path"
    if p.parts and p.parts[0].endswith(":"):
        return "it starts with a drive letter"
    if ".." in p.parts:
        return "it leaves the package folder (..)"
    return None


def canonical(name: str) -> str:
    """A member name as one path (``./a//b`` -> ``a/b``), so that two spellings cannot name two members."""
    return str(PurePosixPath(name))


def check_name(name: str, where: str) -> None:
    """Refuse an unsafe member or file name (absolute, drive letter, ``..``, backslash)."""
    why = _unsafe_name(name)
    if why is not None:
        raise IntegrityError(f"{where}: the package names {name!r}, which is unsafe ({why}); nothing was read "
                             "from it: ask its author for a package without such entries")


def _check_zip(path: Path, limits: ArchiveLimits) -> dict[str, zipfile.ZipInfo]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise IntegrityError(f"{path} is not a readable zip file ({e}): download or export the package again") from e
    with zf:
        infos = zf.infolist()
    members: dict[str, zipfile.ZipInfo] = {}
    total = compressed = 0
    for info in infos:
        check_name(info.filename, str(path))
        if stat.S_ISLNK(info.external_attr >> 16):
            raise IntegrityError(f"{path}: member {info.filename!r} is a symbolic link; nothing was read from the "
                                 "package: ask its author for a package without links")
        if info.is_dir():
            continue
        if info.file_size > limits.max_member_bytes:
            raise IntegrityError(
                f"{path}: member {info.filename!r} expands to {info.file_size / 2**20:.0f} MiB, more than the "
                f"limit of {limits.max_member_bytes / 2**20:.0f} MiB per member"
            )
        ratio = info.file_size / max(1, info.compress_size)
        if info.file_size >= limits.ratio_floor_bytes and ratio > limits.max_ratio:
            raise IntegrityError(
                f"{path}: member {info.filename!r} expands {ratio:.0f}x ({info.compress_size} -> {info.file_size} "
                f"bytes), more than the {limits.max_ratio:g}x allowed: a suspicious (zip-bomb) archive, not read"
            )
        total += info.file_size
        compressed += info.compress_size
        if total > limits.max_total_bytes:
            raise IntegrityError(f"{path}: the members add up to more than {limits.max_total_bytes / 2**30:.0f} GiB")
        name = canonical(info.filename)
        if name in members:
            raise IntegrityError(f"{path}: member {name!r} appears twice")
        members[name] = info
    if total >= limits.ratio_floor_bytes and total / max(1, compressed) > limits.max_ratio:
        raise IntegrityError(
            f"{path}: the archive expands {total / max(1, compressed):.0f}x ({compressed} -> {total} bytes), more than "
            f"the {limits.max_ratio:g}x allowed: a suspicious (zip-bomb) archive, not read"
        )
    return members


def _rdf_member(names: Any, where: Path) -> str:
    for candidate in RDF_NAMES:
        if candidate in names:
            return candidate
    raise IntegrityError(f"{where} has no rdf.yaml (or bioimageio.yaml) at its top level: not a bioimage.io package")


def _sha256(stream: IO[bytes]) -> str:
    h = hashlib.sha256()
    for chunk in iter(lambda: stream.read(_CHUNK), b""):
        h.update(chunk)
    return h.hexdigest()


def named_files(rdf: Mapping[str, Any]) -> list[tuple[str, str | None, str]]:
    """``(source, sha256 or None, where)`` for every local file the description names with a checksum field.

    Format 0.5 file descriptions are mappings with ``source`` and ``sha256``; format 0.4 weights have the same,
    and their ``architecture`` file has ``architecture_sha256`` beside it. Remote sources (URLs) are left out.
    """
    out: list[tuple[str, str | None, str]] = []

    def local(source: Any) -> bool:
        return isinstance(source, str) and bool(source) and "://" not in source

    def walk(node: Any, where: str) -> None:
        if isinstance(node, Mapping):
            src = node.get("source")
            if "sha256" in node and local(src):
                out.append((str(src), node.get("sha256") or None, where))
            arch = node.get("architecture")
            if isinstance(arch, str) and ":" in arch and arch.split(":")[0].endswith(".py"):
                out.append((arch.rpartition(":")[0], node.get("architecture_sha256") or None,
                            f"{where}.architecture"))
            for k, v in node.items():
                walk(v, f"{where}.{k}" if where else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]")

    walk(rdf, "")
    return out


class PackageFiles:
    """An opened, checked package: its description and lazy access to its files (see the module docstring)."""

    def __init__(self, source: Path, limits: ArchiveLimits, tmp: Path) -> None:
        self.source = source
        self.limits = limits
        self._tmp = tmp
        self._members: dict[str, zipfile.ZipInfo] | None = None
        self._root: Path | None = None
        self.model_checked = False
        """Set by :func:`~tilenorm_bmz.bmz.package_io.check_model` once the description was validated."""
        if source.is_dir():
            self._folder: Path | None = source.resolve()
            self.rdf_name = _rdf_member({p.name for p in source.iterdir()}, source)
            _refuse_links(self._folder)
        elif source.suffix.lower() in (".yaml", ".yml"):
            self._folder = source.resolve().parent
            self.rdf_name = source.name
            _refuse_links(self._folder)
        else:
            self._folder = None
            self._members = _check_zip(source, limits)
            self.rdf_name = _rdf_member(self._members, source)
        self.rdf_path = self.file(self.rdf_name, "the description")
        try:
            data = load_yaml(self.rdf_path.read_text(encoding="utf-8"))
        except Exception as e:  # ruyaml raises several error types
            raise IntegrityError(f"{source}: {self.rdf_name} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise IntegrityError(f"{source}: {self.rdf_name} does not hold a mapping")
        self.rdf: dict[str, Any] = data

    def _folder_file(self, name: str, what: str) -> Path:
        assert self._folder is not None
        path = self._folder / name
        if path.is_symlink() or any(p.is_symlink() for p in path.parents if p.is_relative_to(self._folder)):
            raise IntegrityError(f"{self.source}: {what} {name!r} is a symbolic link; not read")
        if not path.resolve().is_relative_to(self._folder):
            raise IntegrityError(f"{self.source}: {what} {name!r} lies outside the package")
        return path

    def _locate(self, name: str, what: str) -> tuple[str, Path | None]:
        """The checked, canonical member name, and its path for an unpacked folder (None for a zip member)."""
        check_name(name, str(self.source))
        name = canonical(name)
        if self._members is None:
            path = self._folder_file(name, what)
            if not path.is_file():
                raise IntegrityError(f"{self.source}: {what} {name!r} is missing from the package")
            return name, path
        if name not in self._members:
            raise IntegrityError(f"{self.source}: {what} {name!r} is missing from the package")
        return name, None

    @contextlib.contextmanager
    def open(self, name: str, what: str = "file") -> Iterator[IO[bytes]]:
        """A binary stream of one file of the package (checked name; no extraction)."""
        name, path = self._locate(name, what)
        if path is not None:
            with open(path, "rb") as fh:
                yield fh
            return
        with zipfile.ZipFile(self.source) as zf, zf.open(self._members[name]) as fh:  # type: ignore[index]
            yield fh

    def file(self, name: str, what: str = "file") -> Path:
        """The path of one file of the package, extracted on first use for zips (bounded by its checked size)."""
        name, path = self._locate(name, what)
        if path is not None:
            return path
        target = self._tmp / "members" / name
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            with self.open(name, what) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
        return target

    def root(self) -> Path:
        """A folder with every file of the package (zips: extracted once, after the member checks)."""
        if self._folder is not None:
            return self._folder
        if self._root is None:
            assert self._members is not None
            for name in self._members:
                self.file(name)
            self._root = self._tmp / "members"
        return self._root

    def verify(self) -> int:
        """Check the sha256 of every local file the description names; returns how many were checked."""
        n = 0
        for source, expected, where in named_files(self.rdf):
            with self.open(source, where) as fh:
                actual = _sha256(fh)
            n += 1
            if expected is not None and actual != str(expected).lower():
                raise IntegrityError(
                    f"{self.source}: {source} ({where}) does not match the sha256 in {self.rdf_name} "
                    f"({actual[:12]}... instead of {str(expected)[:12]}...): the file was changed after the "
                    "package was written; nothing was run from it"
                )
        return n


def _refuse_links(folder: Path) -> None:
    """An unpacked package may hold no symbolic link anywhere: a copy of it (``--record``) would follow them."""
    for root, dirs, names in os.walk(folder, followlinks=False):
        for entry in (*dirs, *names):
            if (Path(root) / entry).is_symlink():
                rel = (Path(root) / entry).relative_to(folder)
                raise IntegrityError(f"{folder}: {rel} is a symbolic link; packages with links are not read")


@contextlib.contextmanager
def open_package(
    source: str | os.PathLike[str], *, verify: bool = True, limits: ArchiveLimits | None = None
) -> Iterator[PackageFiles]:
    """Open a package (zip, folder or rdf.yaml) after its integrity checks; temporary files go on exit.

    Raises
    ------
    FileNotFoundError
        ``source`` does not exist.
    IntegrityError
        Unsafe member names or links, sizes beyond ``limits``, a sha256 mismatch, no or unreadable rdf.yaml.
    """
    src = Path(source)
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    if src.is_file() and src.suffix.lower() not in (".yaml", ".yml") and not zipfile.is_zipfile(src):
        raise IntegrityError(f"{src} is not a bioimage.io package: expected a .zip, a folder or an rdf.yaml")
    with tempfile.TemporaryDirectory(prefix="tilenorm_bmz_pkg_") as tmp:
        files = PackageFiles(src, limits or ArchiveLimits(), Path(tmp))
        if verify:
            n = files.verify()
            logger.debug("%s: %d file(s) match their sha256", src, n)
        yield files
