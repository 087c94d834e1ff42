"""Read official downloads as they come: a folder, a .zip, or a .tar(.gz/.bz2/.xz).

Archives are read member by member, never extracted wholesale, and are checked
before anything is read: a member with an absolute path, a ``..`` component, or
a link that points outside the archive makes the whole archive refused. The
output paths are built by calbench from class names and file names, so nothing
an archive says can place a file outside the output folder.

Members are streamed, never read whole into memory: :meth:`Source.spooled` copies
one in chunks to a temp file (small ones stay in memory) for the decoder, and a
member over :data:`MAX_MEMBER_BYTES` is not read at all.
"""

from __future__ import annotations

import posixpath
import shutil
import stat
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import IO, Optional

from calbench.data.folder import link_problem
from calbench.errors import CalbenchError, warn

#: The largest member calbench reads for decoding: calbench's own choice, about twice the largest
#: image Pillow agrees to decode (its decompression-bomb limit, 89.5 M pixels, is 268 MB as 8-bit RGB),
#: so every image calbench could use fits, and a member that would take gigabytes to read is skipped.
#: Arrays copied out to be memory-mapped (:meth:`Source.local_path`) go to disk and are not capped.
MAX_MEMBER_BYTES = 512 * 2**20
#: a member up to this size is held in memory while it is decoded; a larger one goes to a temp file
SPOOL_BYTES = 8 * 2**20
CHUNK_BYTES = 2**20


class Unreadable(Exception):
    """A source item that cannot be used (does not decode, or is too large); it is skipped with a warning."""


def _size_text(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n} bytes"


def _unsafe(name: str) -> Optional[str]:
    """Why an archive member name is unsafe, or None."""
    if name.startswith(("/", "\\")) or PureWindowsPath(name).drive or PureWindowsPath(name).root:
        return "has an absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "contains '..'"
    return None


def _escapes(member: str, target: str, relative_to_member: bool) -> bool:
    """Whether a link ``member`` -> ``target`` resolves outside the archive root."""
    if target.startswith(("/", "\\")) or PureWindowsPath(target).drive:
        return True
    base = posixpath.dirname(member) if relative_to_member else ""
    resolved = posixpath.normpath(posixpath.join(base, target.replace("\\", "/")))
    return resolved == ".." or resolved.startswith("../")


class Source:
    """A download (folder or archive) as sorted relative POSIX paths of its regular files."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise CalbenchError(f"{self.path} does not exist; give the downloaded archive or its extracted folder")
        self._zip: Optional[zipfile.ZipFile] = None
        self._tar: Optional[tarfile.TarFile] = None
        self._tar_members: dict[str, tarfile.TarInfo] = {}  # by name: tarfile's own lookup scans every member
        if self.path.is_dir():
            self.names = self._list_folder()
        elif zipfile.is_zipfile(self.path):
            self._zip = zipfile.ZipFile(self.path)
            self.names = self._check_zip(self._zip)
        elif _is_tar(self.path):
            self._tar = tarfile.open(self.path)
            self.names = self._check_tar(self._tar)
        else:
            raise CalbenchError(
                f"{self.path} is neither a folder, a .zip nor a .tar archive; give the official download"
            )
        self.names = [n for n in self.names if not _metadata(n)]

    def _list_folder(self) -> list[str]:
        """Regular files under the folder (links to folders are not followed, so a link loop cannot hang it)."""
        names = []
        for path in self.path.rglob("*"):
            if path.is_file():
                names.append(path.relative_to(self.path).as_posix())
            elif path.is_symlink() and not _metadata(path.relative_to(self.path).as_posix()):
                why = link_problem(path)
                if why is not None:
                    warn(f"skipping unreadable file {path} ({why})", stacklevel=4)
        return sorted(names)

    def _refuse(self, member: str, why: str) -> CalbenchError:
        return CalbenchError(
            f"{self.path}: archive member {member!r} {why}; refusing to read this archive (nothing was written)"
        )

    def _check_zip(self, archive: zipfile.ZipFile) -> list[str]:
        names = []
        for info in archive.infolist():
            why = _unsafe(info.filename)
            if why:
                raise self._refuse(info.filename, why)
            if stat.S_ISLNK(info.external_attr >> 16):
                if info.file_size > 4096:  # a link's target is a path: PATH_MAX is 4096 bytes
                    raise self._refuse(info.filename, f"is a link with a {info.file_size}-byte target")
                target = archive.read(info).decode("utf-8", "replace")
                if _escapes(info.filename, target, relative_to_member=True):
                    raise self._refuse(info.filename, f"is a link pointing outside ({target!r})")
                continue  # links inside are not images of their own
            if not info.is_dir():
                names.append(info.filename)
        return sorted(names)

    def _check_tar(self, archive: tarfile.TarFile) -> list[str]:
        names = []
        for member in archive.getmembers():
            why = _unsafe(member.name)
            if why:
                raise self._refuse(member.name, why)
            if member.issym() or member.islnk():
                if _escapes(member.name, member.linkname, relative_to_member=member.issym()):
                    raise self._refuse(member.name, f"is a link pointing outside ({member.linkname!r})")
                continue
            if member.isfile():
                names.append(member.name)
                self._tar_members[member.name] = member
            elif not member.isdir():
                raise self._refuse(member.name, "is a device, FIFO or other special file")
        return sorted(names)

    def open(self, name: str) -> IO[bytes]:
        """A binary file object for member ``name`` (one of :attr:`names`)."""
        if self._zip is not None:
            return self._zip.open(name)
        if self._tar is not None:
            handle = self._tar.extractfile(self._tar_members[name])
            assert handle is not None
            return handle
        return open(self.path / name, "rb")

    def size(self, name: str) -> int:
        """The size in bytes of member ``name``, as the archive declares it."""
        if self._zip is not None:
            return self._zip.getinfo(name).file_size
        if self._tar is not None:
            return self._tar_members[name].size
        return (self.path / name).stat().st_size

    @contextmanager
    def spooled(self, name: str) -> Iterator[IO[bytes]]:
        """A seekable binary file of member ``name``, read in chunks; :class:`Unreadable` over :data:`MAX_MEMBER_BYTES`.

        A folder's file is opened as it is; an archive member is copied to a temp file
        (in memory up to :data:`SPOOL_BYTES`), so the decoder can seek and nothing is read whole.
        """
        size = self.size(name)
        if size > MAX_MEMBER_BYTES:
            raise self._too_large(name, size)
        if self._zip is None and self._tar is None:
            with open(self.path / name, "rb") as handle:
                yield handle
            return
        with self.open(name) as source, tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as copy:
            copied = 0
            while chunk := source.read(CHUNK_BYTES):
                copied += len(chunk)
                if copied > MAX_MEMBER_BYTES:  # the archive understated its size
                    raise self._too_large(name, copied)
                copy.write(chunk)
            copy.seek(0)
            yield copy  # type: ignore[misc]

    def _too_large(self, name: str, size: int) -> Unreadable:
        return Unreadable(
            f"{name} ({_size_text(size)}, over calbench's limit of {_size_text(MAX_MEMBER_BYTES)} for one member, "
            "MAX_MEMBER_BYTES in calbench/data/archive.py)"
        )

    def read(self, name: str) -> bytes:
        """The whole of a small member ``name``; images are read with :meth:`spooled` instead."""
        with self.spooled(name) as handle:
            return handle.read()

    def local_path(self, name: str, scratch: Path) -> Path:
        """A real file for ``name`` (e.g. to memory-map a large .npy): the file itself, or a copy under ``scratch``."""
        if self._zip is None and self._tar is None:
            return self.path / name
        target = scratch / PurePosixPath(name).name
        scratch.mkdir(parents=True, exist_ok=True)
        with self.open(name) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        return target

    def describe(self) -> str:
        """Identity of the download for the re-run check: name, size, modification time."""
        st = self.path.stat()
        return (
            f"{self.path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
            if self.path.is_file()
            else f"{self.path.resolve()}|dir|{len(self.names)}"
        )

    def close(self) -> None:
        for handle in (self._zip, self._tar):
            if handle is not None:
                handle.close()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _metadata(name: str) -> bool:
    """Files that are not data: macOS resource forks (__MACOSX/, ._x) and other hidden files."""
    return any(part == "__MACOSX" or part.startswith(".") for part in PurePosixPath(name).parts)


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False
