"""Crash-safe file writing, hashing and locking: nothing already written is lost or half-overwritten;
and reading JSON and JSON Lines files, where a file that is not UTF-8 or not JSON is one line naming it.

Files are written to a temporary sibling and renamed into place (atomic on POSIX);
directories are built under a temporary name and renamed at the end. A second writer of
the same output (two `prepare --out D`, two `train --resume R`) is kept out by an
exclusive `flock` on a lock file, held for the whole write; the kernel drops it when the
process dies, so a killed writer never leaves a lock that is still held.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from . import SlowrunError


class BusyError(SlowrunError):
    """Another process holds the lock of what this one wants to write."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of a JSON value in canonical form (sorted keys, no whitespace), so it survives re-indenting."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())


def _umask() -> int:
    """The process umask (only readable by setting it: set and restored at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_mode() -> int:
    """The mode open() gives a new file: 0666 less the umask."""
    return 0o666 & ~_umask()


def umask_mode(path: str | Path) -> None:
    """Give a file `file_mode()`: for writers, such as safetensors' save_file, that always create 0600."""
    os.chmod(path, file_mode())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())  # mkstemp makes 0600; a written file gets what open() would give it
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:  # e.g. a full disk: name the file it was for
            raise OSError(e.errno, f"could not write {path}: {e.strerror}") from None
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


@contextlib.contextmanager
def atomic_directory(final: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces `final` only if the block succeeds.

    With `force`, an existing `final` is moved aside and deleted only after the new
    directory is in place, so an interruption never leaves neither.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".partial"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the directory gets what mkdir() would give it
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        if not force:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(f"{final} already exists")
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_leftovers(final: str | Path) -> list[str]:
    """Remove what a killed `atomic_directory(final)` left beside `final`: its build directories
    (`.NAME.XXXXXXXX.partial`) and an old copy a `force` replace had moved aside (`.NAME.old-PID`).
    Killed between its two renames, the replace leaves no `final` but the old copy: that is put
    back. Call it only holding the lock every writer of `final` takes, so that none is live.
    Returns the names removed."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    mine = re.compile(rf"\.{re.escape(final.name)}\.(?:[a-z0-9_]{{8}}\.partial|old-\d+)")  # mkdtemp's 8 characters
    found = sorted(p for p in final.parent.iterdir() if mine.fullmatch(p.name) and p.is_dir() and not p.is_symlink())
    olds = [p for p in found if ".old-" in p.name]
    if olds and not final.exists():
        os.replace(olds[-1], final)
        found.remove(olds[-1])
    for p in found:
        shutil.rmtree(p, ignore_errors=True)
    return [p.name for p in found]


@contextlib.contextmanager
def exclusive_lock(lock_path: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive, non-blocking `flock` on `lock_path` for the block, or raise BusyError.

    `what` names the resource in the error ("--out data/x"). The holder's pid is written
    into the file so the error can say who holds it. The holder removes the file before
    releasing it; a process that locked a file already removed (the inode at the path
    changed) tries again, so two processes never hold locks on two different files.
    """
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(10):
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise BusyError(f"{what} is in use by another slowrun process{f' (pid {holder})' if holder else ''}; "
                            "wait for it to finish") from None
        try:
            if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the previous holder removed this file between our open and flock
    else:
        raise BusyError(f"{what}: could not take its lock {lock_path}")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)
        os.close(fd)  # closing the descriptor releases the lock


# ---------------------------------------------------------------------------------------
# reading JSON


def parse_json(text: str, where: str, error: type[SlowrunError] = SlowrunError, one_line: bool = False) -> Any:
    """The JSON value of `text`, or `error` naming `where` (a file, or FILE:LINE for one line of
    JSON Lines) with the line and column, and saying so when the text ends early (truncated)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        cut = e.pos >= len(text.rstrip()) or not text.rstrip().endswith(("}", "]"))
        ends = f" (the {'line' if one_line else 'file'} ends early: truncated?)" if cut else ""
        if one_line:
            raise error(f"{where}: corrupt, not valid JSON ({e.msg}, column {e.colno}){ends}") from None
        raise error(f"{where}: corrupt, not valid JSON at line {e.lineno}, column {e.colno} ({e.msg}){ends}") from None


def read_text(path: str | Path, error: type[SlowrunError] = SlowrunError, what: str = "") -> str:
    """A UTF-8 text file, or `error` naming it (after `what`, e.g. the flag that gave it) and the
    first byte that is not UTF-8. A missing file is the OSError, which the command line prints
    in one line."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{_named(path, what)}: corrupt, not UTF-8 text (byte {e.start:,})") from None


def read_json(path: str | Path, error: type[SlowrunError] = SlowrunError, what: str = "") -> Any:
    """The JSON value of a file; a file that is not UTF-8 or not JSON is `error`, one line naming
    it (after `what`, e.g. "--ablation")."""
    return parse_json(read_text(path, error, what), _named(path, what), error)


def _named(path: str | Path, what: str) -> str:
    return f"{what} {path}" if what else str(path)


def read_json_lines(path: str | Path, error: type[SlowrunError] = SlowrunError,
                    skip_corrupt: bool = False) -> Iterator[tuple[int, Any]]:
    """(line number, value) of every non-blank line of a JSON Lines file. A line that is not UTF-8
    or not JSON is `error` naming FILE:LINE; with `skip_corrupt` it is passed over (the torn last
    line of a log a killed process was writing)."""
    path = Path(path)
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                value = parse_json(line, f"{path}:{n}", error, one_line=True)
            except UnicodeDecodeError as e:
                if skip_corrupt:
                    continue
                raise error(f"{path}:{n}: corrupt, not UTF-8 text (byte {e.start:,} of the line)") from None
            except error:
                if skip_corrupt:
                    continue
                raise
            yield n, value
