"""Files written whole or not at all, and cache entries read without trusting a broken one.

Every stage writes its outputs and caches through these helpers: a temp file or folder beside the target, renamed
into place on success and removed on failure, so an interrupted run or a full disk leaves the previous version or
none. Outputs get the modes the user's umask gives (a teammate can read a finished run), not the 0600/0700 of
mkstemp/mkdtemp. A cache entry that cannot be loaded is a miss, never a crash.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from runstore.errors import describe, naming_full_disk

T = TypeVar("T")
CACHE_LOG = logging.getLogger("merge_eval.cache")


def umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask can only set it: setting and
    restoring races with threads creating files meanwhile, as Prefect's task threads do)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def default_mode(directory: bool = False) -> int:
    """The mode open()/mkdir() would give a new file or directory under the user's umask."""
    return (0o777 if directory else 0o666) & ~umask()


TEMP_SUFFIX = ".tmp"  # every temp file and folder the helpers below make is named ".<target name>.<random>.tmp"


def is_temp_name(name: str) -> bool:
    """Whether `name` is one of our temp files or folders (what a killed run can leave behind)."""
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temp path beside `target`; on success it replaces `target` (with the umask's mode), on error it is
    removed and `target` is left as it was. A full disk becomes `NoSpaceError` naming `target`."""
    target = Path(target)
    with naming_full_disk(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent)
        os.close(fd)
        temp = Path(name)
        try:
            os.chmod(temp, default_mode())
            yield temp
            os.replace(temp, target)
        finally:
            temp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(target: Path, replace: bool = True) -> Iterator[Path]:
    """Yield a new folder beside `target` to build into; on success it is renamed to `target`, every file in it
    with the umask's modes. An existing `target` is swapped out first (`replace`) or kept, the new build discarded
    (not `replace`: another process finished the same content first). On error the build is removed, so `target`
    is only ever absent, the old folder or the whole new one. A full disk becomes `NoSpaceError` naming `target`.
    """
    target = Path(target)
    with naming_full_disk(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        build = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent))
        try:
            yield build
            follow_umask(build)
            if target.exists() and not replace:
                shutil.rmtree(build)
                return
            if target.exists():  # rename() cannot replace a non-empty folder: move the old one aside first
                aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent))
                os.replace(target, aside / target.name)
                build.rename(target)
                shutil.rmtree(aside, ignore_errors=True)
            else:
                build.rename(target)
        except BaseException:  # interrupted or failed: no half-built folder stays behind
            shutil.rmtree(build, ignore_errors=True)
            raise


def atomic_symlink(link: Path, source: Path) -> Path:
    """`link` -> `source` (a folder), replacing an older link in one rename."""
    with atomic_path(link) as temp:
        temp.unlink()
        temp.symlink_to(Path(source).resolve(), target_is_directory=True)
    return Path(link)


def follow_umask(folder: Path) -> None:
    """Give `folder` and everything in it the umask's modes: libraries that build a folder for us (mergekit)
    write some files through mkstemp (0600) and copy others with their source's mode; mkdtemp makes 0700."""
    for path in [Path(folder), *Path(folder).rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, default_mode(directory=path.is_dir()))


def remove_temps(root: Path) -> list[Path]:
    """Remove every temp file and folder under `root` (symlinks not followed) that a killed process left behind;
    only safe while no other process writes there (the run-directory lock). Returns what was removed."""
    removed = []
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            if is_temp_name(name):
                path = Path(folder) / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
        dirs[:] = [d for d in dirs if not is_temp_name(d)]
    return removed


def read_cached(path: Path, load: Callable[[Path], T]) -> T | None:
    """`load(path)` for a cache entry, or None on a miss. An entry that fails to load (cut short by a full disk or
    a killed copy, corrupted) is logged naming the file, removed, and treated as a miss: the caller recomputes it.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return load(path)
    except Exception as error:  # noqa: BLE001 - every reader fails its own way; no failed entry is trusted
        CACHE_LOG.warning("cache entry %s is unreadable (%s); removed, recomputing it", path, describe(error))
        path.unlink(missing_ok=True)
        return None


def atomic_write_text(target: Path, text: str) -> None:
    with atomic_path(target) as temp:
        temp.write_text(text)
