"""Writing output files safely: never over an existing file unless asked, never half-written.

Every output is written to a temporary name in the destination folder and renamed into place when complete,
so an interrupted run leaves either the finished file or nothing under the final name. The temporary file is
created as a plain ``open()`` would create it (mode 0o666 less the umask), so the finished file has the
permissions the user expects (0644 under a umask of 022), not ``tempfile.mkstemp``'s private 0600.
"""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import SdcliError


class OutputExistsError(SdcliError):
    """The output path exists and overwriting was not asked for."""


def check_output(path: str | Path, overwrite: bool = False) -> Path:
    """``path`` as a Path, after checking it may be written."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise SdcliError(f"{path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} exists; pass --overwrite to replace it")
    if not path.parent.is_dir():
        raise SdcliError(f"cannot write {path}: the folder {path.parent} does not exist")
    return path


def open_temporary_beside(path: Path) -> tuple[int, Path]:
    """(descriptor, path) of a new, empty file beside ``path`` under a name no other file has, opened for writing
    and created with the umask's permissions, as a plain open() creates files."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.partial")
        try:
            return os.open(temporary, flags, 0o666), temporary
        except FileExistsError:
            continue


@contextmanager
def atomic_output(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``, on failure removed."""
    path = check_output(path, overwrite)
    handle, temporary = open_temporary_beside(path)
    os.close(handle)
    try:
        yield temporary
        if not overwrite and path.exists():
            raise OutputExistsError(f"{path} appeared while writing; pass --overwrite to replace it")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def save_array(path: str | Path, array: np.ndarray, overwrite: bool = False) -> Path:
    """Write ``array`` as a .npy file, atomically."""
    with atomic_output(path, overwrite) as temporary:
        with open(temporary, "wb") as stream:
            np.save(stream, array)
    return Path(path)
