"""Atomic file writing: a crash mid-save never leaves a half-written file."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import BadInputError

#: extensions a temporary file keeps, so that writers that look at the name see the right format
_KNOWN_SUFFIXES = (".nii.gz", ".safetensors", ".tiff", ".tif", ".nii", ".png", ".json", ".ckpt")
#: temporary names stay this many bytes under the usual 255-byte limit on a file name,
#: leaving room for a writer that appends an extension of its own
_NAME_MAX = 255 - 16


def _umask_from_proc() -> int | None:
    """The process umask as Linux reports it (no side effect), or None where it does not."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _umask_at_import() -> int:
    """Read by setting and restoring it: only here, once, while importing (before any worker thread)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_IMPORT_UMASK = _umask_from_proc()
if _IMPORT_UMASK is None:
    _IMPORT_UMASK = _umask_at_import()


def current_umask() -> int:
    """The process umask, read without changing it.

    ``os.umask`` can only read the mask by setting it, and the mask is
    process-wide: in a multi-threaded program another thread creating a file
    in between would get the temporary mask. Linux reports the mask in
    ``/proc/self/status``; elsewhere the value read at import is used.
    """
    mask = _umask_from_proc()
    return _IMPORT_UMASK if mask is None else mask


def _temp_affixes(target: Path) -> tuple[str, str]:
    """(prefix, suffix) for ``mkstemp``: short enough for any legal target name.

    ``.<stem>.XXXXXXXX.part<ext>``, with the stem cut so that the whole name
    (8 random characters included) stays within ``_NAME_MAX`` bytes.
    """
    name = target.name
    lower = name.lower()
    ext = next((s for s in _KNOWN_SUFFIXES if lower.endswith(s)), "")
    if not ext:
        ext = target.suffix if len(os.fsencode(target.suffix)) <= 16 else ""
    suffix = f".part{ext}" if ext else ".part"
    stem = name[: len(name) - len(ext)] if ext else name
    room = _NAME_MAX - len(os.fsencode(suffix)) - 8 - 2  # random part and the two dots
    # names are bytes to the file system: a name that is not valid UTF-8 keeps its bytes
    encoded = os.fsencode(stem)[: max(0, room)]
    stem = os.fsdecode(encoded)
    return f".{stem}.", suffix


def stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Temporary files :func:`atomic_path` made for ``target`` and never removed.

    A writer killed outright (SIGKILL, power loss, a cluster worker that died)
    cannot clean up; its temporary file keeps the name ``.<stem>.XXXXXXXX.part<ext>``
    (plus any extension a writer appended). Only names of exactly that shape are listed.
    """
    target = Path(target)
    prefix, suffix = _temp_affixes(target)
    shape = re.compile(re.escape(prefix) + r"[A-Za-z0-9_]{8}" + re.escape(suffix) + r"(\.[A-Za-z0-9.]+)?$")
    try:
        names = os.listdir(target.parent)
    except OSError:
        return []
    return sorted(target.parent / n for n in names if shape.match(n))


def remove_stale_temporaries(targets) -> list[Path]:
    """Remove :func:`stale_temporaries` of every target; return what was removed.

    Call it only when no writer of these targets can still be running.
    """
    removed = []
    for target in targets:
        for tmp in stale_temporaries(target):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def check_regular_file(path: str | os.PathLike, what: str = "file") -> None:
    """Raise ``BadInputError`` unless ``path`` is a regular file (symbolic links followed).

    A directory, FIFO, device or socket is named as such (it exists, so it is
    not "not found"); nothing is opened, so a FIFO cannot block.
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.lexists(path):
            raise BadInputError(f"{what} {path} is a broken symbolic link") from None
        raise BadInputError(f"{what} {path}: no such file") from None
    except OSError as exc:
        raise BadInputError(f"cannot access {what} {path}: {exc.strerror or exc}") from exc
    if stat.S_ISREG(st.st_mode):
        return
    if stat.S_ISDIR(st.st_mode):
        kind = "a directory"
    elif stat.S_ISFIFO(st.st_mode):
        kind = "a FIFO (named pipe)"
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        kind = "a device"
    elif stat.S_ISSOCK(st.st_mode):
        kind = "a socket"
    else:
        kind = "not a regular file"
    raise BadInputError(f"{what} {path} is {kind}, not a regular file")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it over ``target`` on success.

    The temporary file lives in the same directory, so the final rename is
    atomic. On any error (and on SIGINT or SIGTERM, which the command line
    turns into exceptions) the temporary file is removed and ``target`` is left
    as it was. OS errors (no permission, disk full) become ``BadInputError``.
    ``overwrite=False``: an existing ``target`` is never replaced, even one
    created while the file was being written (``BadInputError``).
    """
    target = Path(target)
    if not overwrite and os.path.lexists(target):
        raise BadInputError(f"{target} exists; not replacing a file this run did not create")
    prefix, suffix = _temp_affixes(target)
    try:
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=target.parent)
    except OSError as exc:
        raise BadInputError(f"cannot write to {target.parent}: {exc.strerror or exc}") from exc
    tmp_path = Path(tmp)
    try:
        os.close(fd)
        # mkstemp creates 0600; give the file the permissions a plain open() would
        os.chmod(tmp_path, 0o666 & ~current_umask())
        yield tmp_path
        if overwrite:
            os.replace(tmp_path, target)
        else:
            _move_no_clobber(tmp_path, target)
    except OSError as exc:
        raise BadInputError(f"cannot write {target}: {exc.strerror or exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def _move_no_clobber(tmp: Path, target: Path) -> None:
    """Move ``tmp`` to ``target`` unless ``target`` exists (atomically where links work)."""
    try:
        os.link(tmp, target)
    except FileExistsError as exc:
        raise BadInputError(f"{target} exists; not replacing a file this run did not create") from exc
    except OSError as exc:  # a file system without hard links
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if os.path.lexists(target):
            raise BadInputError(f"{target} exists; not replacing a file this run did not create") from exc
        os.replace(tmp, target)
    else:
        tmp.unlink()


def write_atomic(target: str | os.PathLike, writer: Callable[[Path], None], overwrite: bool = True) -> Path:
    """Call ``writer(tmp_path)`` then move the result to ``target`` atomically."""
    with atomic_path(target, overwrite=overwrite) as tmp:
        writer(tmp)
    return Path(target)


def write_bytes_atomic(target: str | os.PathLike, data: bytes, overwrite: bool = True) -> Path:
    def writer(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    return write_atomic(target, writer, overwrite=overwrite)
