"""Read official downloads as they come: a folder, a .zip, or a .tar(.gz/.bz2/.xz).

Archives are read member by member, never extracted wholesale, and are checked
before anything is read: a member with an absolute path, a ``..`` component, or
a link that points outside the archive makes the whole archive refused. The
output paths are built by calbench from class names and file stems, so nothing
an archive says can place a file outside the output folder.
"""

from __future__ import annotations

import posixpath
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import IO, Optional

from calbench.errors import CalbenchError


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
        if self.path.is_dir():
            self.names = sorted(p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file())
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
            elif not member.isdir():
                raise self._refuse(member.name, "is a device, FIFO or other special file")
        return sorted(names)

    def open(self, name: str) -> IO[bytes]:
        """A binary file object for member ``name`` (one of :attr:`names`)."""
        if self._zip is not None:
            return self._zip.open(name)
        if self._tar is not None:
            handle = self._tar.extractfile(name)
            assert handle is not None
            return handle
        return open(self.path / name, "rb")

    def read(self, name: str) -> bytes:
        with self.open(name) as handle:
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
