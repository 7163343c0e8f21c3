"""The one base class of mistakes a user can fix, and the disk-full fault every writer can meet.

Each stage raises its own subclass of `UserError` (ConfigError, CheckpointError, HolmesError, ...); the CLI
catches the base class alone and prints one line per problem with exit 2, so a new stage's errors need no CLI
change. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from typing import Iterator

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# Rust-backed writers (polars, safetensors) raise their own types and keep the OS error only in the message.
_DISK_FULL_TEXTS = tuple(os.strerror(code) for code in DISK_FULL_ERRNOS)


class UserError(ValueError):
    """A problem the user can fix; `lines()` is what the CLI prints, one line each."""

    def lines(self) -> list[str]:
        return list(getattr(self, "problems", None) or str(self).split("\n") or [type(self).__name__])


class NoSpaceError(UserError, OSError):
    """The disk (or quota) filled up while writing `target`; the previous version of `target` is kept."""


def is_disk_full(error: BaseException) -> bool:
    """True when `error` (an OSError, or a library error wrapping one) says the device or quota is full."""
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
        return True
    return any(text in str(error) for text in _DISK_FULL_TEXTS)


def describe(error: BaseException) -> str:
    """`Type: first line of the message`: enough to name a library's reason on one line."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def no_space(target: os.PathLike | str, error: BaseException) -> NoSpaceError:
    """The error to raise when writing `target` filled the disk: what happened, and what is kept."""
    kept = "the previous version is kept" if os.path.lexists(target) else "nothing was written"
    return NoSpaceError(f"{target}: no space left on device while writing it ({type(error).__name__}); {kept}; "
                        f"free some space and run again")


@contextmanager
def naming_full_disk(target: os.PathLike | str) -> Iterator[None]:
    """Turn a disk-full failure inside the block, whichever library raised it, into `NoSpaceError` for `target`."""
    try:
        yield
    except NoSpaceError:
        raise
    except Exception as error:
        if is_disk_full(error):
            raise no_space(target, error) from error
        raise
