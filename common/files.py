"""Files that are either complete or absent: atomic writes and checksum-verified downloads.

Every file a run leaves behind (summary.json, tables, figures, caches, downloads) is written to
a temporary file in the same folder, flushed to disk, and renamed into place. A rename within
one filesystem is atomic, so a reader (or a crash) sees the old file or the new one, never half
of one. The temporary name is unique per host and process, so ranks or nodes sharing a
filesystem that write the same file at once cannot damage each other's.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.errors import UserError


def temp_path_beside(path: Path) -> Path:
    """A fresh hidden name in ``path``'s folder: ``.<name>.<host>.<pid>.<random>.tmp``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def write_atomic(path: Path, write: Callable[[Path], Any], previous: Path | None = None) -> Path:
    """Call ``write(tmp)`` to fill a temporary file beside ``path``, fsync it, rename it to ``path``.

    With ``previous``, the file ``path`` held is first renamed to ``previous`` (one older copy
    kept), and only once the new file is complete. On any failure the temporary file is removed
    and the error propagates; ``path`` is then untouched (the previous version, if any, stays).
    Returns ``path``.
    """
    path = Path(path)
    tmp = temp_path_beside(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # flush to disk before the rename makes it visible
            os.fsync(f.fileno())
        if previous is not None and path.exists():
            os.replace(path, previous)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see ``write_atomic``)."""
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def torch_save_atomic(path: Path, obj: Any) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (see ``write_atomic``)."""
    import torch

    return write_atomic(path, lambda tmp: torch.save(obj, tmp))


def verified_download(url: str, dest: Path, sha256: str, *, hint: str, timeout_s: float = 60.0) -> Path:
    """Fetch ``url`` to ``dest``: a temporary file beside it, SHA-256 checked, then renamed.

    Safe when several processes call it at once: each writes its own temporary file and the
    rename is atomic, so readers only ever see a complete, verified file. Every failure (folder
    not writable, network error, checksum mismatch) removes the temporary file and raises one
    UserError that names ``dest`` or ``url`` and ends with ``hint`` (where to get the file by
    hand). Returns ``dest``.
    """
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not writable_dir(dest.parent):
            raise PermissionError(13, "folder is read-only")
        tmp = temp_path_beside(dest)
        tmp.touch(exist_ok=False)
    except OSError as err:
        raise UserError(
            f"{dest}: not found, and {dest.parent} is not writable for a download ({err.strerror or err}); {hint}"
        ) from None
    try:
        digest = hashlib.sha256()
        with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=timeout_s) as response:
            for block in iter(lambda: response.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != sha256:
            raise UserError(
                f"{url}: checksum mismatch: the downloaded file has SHA-256 "
                f"{digest.hexdigest()}, expected {sha256} (corrupt or changed "
                f"download); {hint}"
            )
        os.replace(tmp, dest)
    except UserError:
        tmp.unlink(missing_ok=True)
        raise
    except (OSError, ValueError) as err:  # URLError/HTTPError/timeouts are OSErrors
        tmp.unlink(missing_ok=True)
        raise UserError(f"{dest}: not found and the download failed ({url}: {err}); {hint}") from None
    return dest


def writable_dir(path: Path) -> bool:
    """A folder we may write to (created if absent). Its mode bits count too: root passes
    ``os.access`` even for a folder marked read-only (such as a shared, read-only data folder),
    which must stay untouched."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK) and bool(path.stat().st_mode & 0o222)
