"""Files and folders the commands write: atomically, and with the usual permissions.

``tempfile.mkstemp`` and ``tempfile.mkdtemp`` create ``0600`` files and ``0700`` folders (they are
meant for secrets); renamed into place they would keep those modes. Here the temporary file or
folder is created the way ``open`` and ``mkdir`` create one, ``0666`` / ``0777`` minus the umask
(``0644`` / ``0755`` under the usual umask ``022``), exclusively under a random name.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

__all__ = ["new_folder", "write_atomic"]

_TRIES = 100


def new_folder(parent: str | os.PathLike, prefix: str) -> Path:
    """Create a new empty folder ``parent / (prefix + random)``, mode ``0777`` minus the umask.

    Raises:
        OSError: the folder cannot be created (parent missing, not writable...).

    Examples:
        >>> import stat, tempfile
        >>> old = os.umask(0o022)
        >>> folder = new_folder(tempfile.mkdtemp(), ".demo.tmp-")
        >>> _ = os.umask(old)
        >>> folder.name.startswith(".demo.tmp-"), oct(stat.S_IMODE(folder.stat().st_mode))
        (True, '0o755')
    """
    for _ in range(_TRIES):
        path = Path(parent) / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir(mode=0o777)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free name {prefix}* in {str(parent)!r} after {_TRIES} tries.")


def _new_file(parent: Path, prefix: str) -> Path:
    for _ in range(_TRIES):
        path = parent / f"{prefix}{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free name {prefix}*.tmp in {str(parent)!r} after {_TRIES} tries.")


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Write ``path`` through a temporary file in the same folder, then rename it into place.

    ``write(tmp)`` writes the content to the temporary path; a failure leaves neither a
    half-written ``path`` nor the temporary file. The file gets mode ``0666`` minus the umask.

    Returns:
        ``path`` as a ``Path``.

    Examples:
        >>> import stat, tempfile
        >>> old = os.umask(0o022)
        >>> p = write_atomic(Path(tempfile.mkdtemp()) / "a.txt", lambda tmp: tmp.write_text("hi"))
        >>> _ = os.umask(old)
        >>> p.read_text(), oct(stat.S_IMODE(p.stat().st_mode))
        ('hi', '0o644')
    """
    path = Path(path)
    tmp = _new_file(path.parent, f".{path.name}.")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
