"""Where each stage keeps what it wrote, and writes that a crash can never leave half done."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import failpoints


@dataclass(frozen=True)
class Store:
    """The output folder's layout. Every stage reads and writes through these paths only."""

    root: Path

    @property
    def raw(self) -> Path:
        """The raw zone: traces as logged (encrypted), by call day, and the ingest ledger."""
        return self.root / "raw"

    @property
    def tables(self) -> Path:
        return self.root / "store"

    @property
    def adapters(self) -> Path:
        return self.root / "adapters"

    @property
    def evaluation(self) -> Path:
        return self.root / "eval"

    @property
    def registry(self) -> Path:
        return self.root / "registry"

    def table(self, name: str) -> Path:
        return self.tables / f"{name}.parquet"

    def stats(self, name: str) -> Path:
        return self.tables / f"{name}.json"


# One run at a time writes an output folder: the lock file's lock (flock) is held for the run
# (or each of its steps) and released by the OS when the holder exits, even when it is killed.
LOCK_FILE, LOCK_HOLDER = ".slm-convert.lock", ".slm-convert.lock.holder.json"


def contained(root: Path, relative: str) -> Path | None:
    """`root / relative`, or None when that path would leave `root`: an absolute key, `..`, or a
    symbolic link under `root` that points elsewhere. Whoever may write a key (a bucket's, a
    router.yaml entry's) must not thereby reach files anywhere else on the machine."""
    parts = relative.split("/")
    if relative.startswith("/") or any(part in ("", ".", "..") for part in parts) or "\x00" in relative:
        return None
    target = Path(root) / relative
    resolved_root = Path(root).resolve()
    return target if target.resolve().is_relative_to(resolved_root) else None


# Everything the pipeline and the router write holds logged calls or a model trained on them: files
# are their owner's only (0600, folders 0700), as the raw zone's always were. Each entry point (the
# two commands, the code location Dagster loads) sets this before it writes anything.
OWNER_ONLY_UMASK = 0o077


def write_owner_only() -> None:
    """New files and folders of this process are its owner's only."""
    os.umask(OWNER_ONLY_UMASK)


def make_owner_only(folder: Path) -> None:
    """A folder tree's files 0600 and folders 0700: a copy keeps its source's modes, whatever the
    umask (an adapter that PEFT saved 0644, a base model from a wheel)."""
    folder = Path(folder)
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o700 if path.is_dir() else 0o600)


@contextmanager
def exclusive(root: Path, holder: str, log: Callable[[str], None] = print, report_every: float = 60.0) -> Iterator[None]:
    """Hold the output folder `root` alone for the block, waiting (and saying who holds it, every
    `report_every` seconds) while another run has it."""
    from filelock import FileLock, Timeout

    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(root / LOCK_FILE, mode=0o600)
    timeout = 0.0  # the first try says at once that the run waits
    while True:
        try:
            lock.acquire(timeout=timeout)
            break
        except Timeout:
            log(f"waiting for the output folder {root}, held by {_lock_holder(root)}")
            timeout = report_every
    try:
        swept = sweep_leftovers(root)
        if swept:
            log(f"removed {swept} temporary file(s) or folder(s) that an interrupted run left in {root}")
        write_json(root / LOCK_HOLDER, {"holder": holder, "pid": os.getpid(), "host": socket.gethostname(),
                                        "since": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        yield
    finally:
        lock.release()


def sweep_leftovers(root: Path) -> int:
    """Delete what killed writers left: temporary files of atomic writes (`.<name>.*.tmp`) and
    staging folders (`*.partial`). Nothing ever reads them; called with the folder held, when no
    write is under way. The raw zone's staged parts are not touched: collection itself decides,
    from its ledger, whether to publish or drop them."""
    leftovers = [p for p in root.rglob("*") if (p.is_file() and p.name.startswith(".") and p.name.endswith(".tmp"))
                 or (p.is_dir() and p.name.endswith(".partial"))]
    for path in leftovers:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return len(leftovers)


def _lock_holder(root: Path) -> str:
    try:
        held = read_json(root / LOCK_HOLDER)
        return f"{held['holder']} (pid {held['pid']} on {held['host']}, since {held['since']})"
    except (OSError, DamagedFileError, KeyError, TypeError):
        return "another process"


class DamagedFileError(RuntimeError):
    """A file of the output folder that cannot be read; the message names it and the fix."""


class DiskFullError(OSError):
    """A write that ran out of space; the file it would have replaced is left as it was."""


# errno values of a write that found no room: no space left, disk quota exceeded
NO_ROOM = {errno.ENOSPC, errno.EDQUOT}


def disk_full_message(path: Path) -> str:
    free = shutil.disk_usage(next(p for p in [path, *path.parents] if p.exists())).free
    kept = "the file there before was left as it was" if path.exists() else "nothing was written in its place"
    return (f"no space left on the device writing {path} ({free / 2**20:.1f} MiB free there): free space, or point "
            f"SLM_OUTPUT_DIR at a larger disk, and run again ({kept})")


@contextmanager
def _atomic(path: Path) -> Iterator[tuple[int, str]]:
    """A temporary file beside `path` (an open descriptor, owner-only 0600) that replaces `path`
    in one rename when the block ends; on any error it is removed and `path` stays as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        yield fd, tmp
        failpoints.reached(f"before-rename:{path.name}")
        os.replace(tmp, path)
    except BaseException as err:
        with suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.errno in NO_ROOM:
            raise DiskFullError(err.errno, disk_full_message(path)) from err
        raise


def replace_folder(staging: Path, target: Path) -> None:
    """Put a finished folder (written whole at `staging`) in place of `target` by renames, so that
    a reader finds the old folder or the new one, never part of either; a process killed between
    the two renames leaves no `target` (its stage makes it again) and the old one hidden aside."""
    failpoints.reached(f"before-rename:{target.name}")
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def write_bytes(path: Path, payload: bytes) -> None:
    """Write bytes atomically to an owner-only (0600) file."""
    with _atomic(path) as (fd, _), os.fdopen(fd, "wb") as f:
        f.write(payload)


def write_json(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    with _atomic(path) as (fd, _), os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=str)
        f.write("\n")


def _damaged(path: Path, err: Exception) -> DamagedFileError:
    return DamagedFileError(
        f"{path} is damaged and cannot be read ({type(err).__name__}: {err}). The pipeline writes it "
        "atomically, so something outside it changed the file (a disk fault, a partial copy, an edit): "
        "delete it and run again (`slm-convert run`, or materialize the stage that writes it and those after it)"
    )


def read_json(path: Path) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _damaged(path, err) from err


def write_table(path: Path, frame: pd.DataFrame, schema: pa.Schema | None = None) -> None:
    """Write a Parquet table atomically (temporary file, then rename)."""
    table = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
    with _atomic(path) as (fd, tmp):
        os.close(fd)
        pq.write_table(table, tmp)


def read_table(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: materialize the upstream asset that writes it first"
        )
    try:
        return pq.read_table(path).to_pandas()
    except (pa.ArrowException, OSError) as err:  # a truncated file is ArrowInvalid, a bad page an OSError
        raise _damaged(path, err) from err
