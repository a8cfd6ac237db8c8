"""Failures an entry point can explain, as one line that names the file.

    with one_line_errors(parser):
        ...the job...

`InputError` (the config, a data file, an image, a checkpoint or tokenizer that cannot be
used) ends the process with exit status 2; an `OSError` (an unwritable folder, a full disk)
with status 2 when it names a path the user gave that cannot be used, 1 otherwise. Anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# The errno values that say "this path cannot be used" (usage), not "the machine failed".
_UNUSABLE_PATH = {
    errno.ENOENT,
    errno.EACCES,
    errno.EPERM,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EROFS,
    errno.EEXIST,
    errno.ENAMETOOLONG,
    errno.ELOOP,
}

_NO_SPACE = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


class InputError(ValueError):
    """Bad input or usage, in one line that names the file (exit status 2)."""


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def describe_os_error(error: OSError, path: str | Path | None = None) -> str:
    """'PATH: reason' for an OSError, naming `path` where the error itself names no file."""
    name = error.filename or path or "?"
    return f"{name}: {error.strerror or first_line(error)}"


def read_text(path: str | Path, what: str = "file") -> str:
    """A UTF-8 text file's contents; InputError naming it where it cannot be read or decoded."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"{path}: cannot read {what} ({e.strerror or first_line(e)})") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None


def parse_json(text: str, source: str) -> Any:
    """json.loads with errors as one InputError line naming `source`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{source}: invalid JSON ({e})") from None
    except RecursionError:
        raise InputError(f"{source}: JSON nested too deeply to read") from None


def check_writable(path: str | Path) -> None:
    """Creates `path`'s folder and writes a probe file there, before any work that would be lost
    if the result could not be written; InputError naming the path otherwise."""
    folder = Path(path).parent
    try:
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(folder))
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe-"):
            pass
    except OSError as e:
        raise InputError(f"{path}: cannot write there ({describe_os_error(e, folder)})") from None


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """An OSError raised while writing `path` names it: a full disk's error names no file (or,
    from a copy, the source)."""
    try:
        yield
    except OSError as e:
        if e.filename and e.errno not in _NO_SPACE:
            raise
        raise OSError(e.errno, e.strerror or first_line(e), str(path)) from None


@contextmanager
def one_line_errors(parser: argparse.ArgumentParser) -> Iterator[None]:
    """Turns InputError and OSError into one line on stderr and the exit status above."""
    try:
        yield
    except InputError as e:
        parser.exit(2, f"error: {first_line(e)}\n")
    except OSError as e:
        parser.exit(2 if e.errno in _UNUSABLE_PATH else 1, f"error: {describe_os_error(e)}\n")
