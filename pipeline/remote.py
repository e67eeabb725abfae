"""An output folder on object storage, worked on through a local copy.

SLM_OUTPUT_DIR may be any fsspec URL (`s3://bucket/prefix`, `gs://...`, `az://...`; the
filesystem's package installed, e.g. `pip install -e '.[s3]'`, credentials as that package reads
them: for S3 the usual AWS_* variables, AWS_ENDPOINT_URL for MinIO or another S3-compatible
server). Every stage reads and writes plain local files; the local copy is kept in step with the
bucket:

- a run (or each step, where steps run in processes or pods of their own) `pull`s what changed in
  the bucket when it takes the output folder;
- each stage `push`es what it changed before it reports success, so that the next step, another
  machine or the router sees it; a push that fails fails the stage.

A push uploads changed files first and the commit files last, in the order the pipeline commits
locally: the raw zone's ledger after its parts (readers ignore parts of runs the ledger has not
committed), history.jsonl and then router.yaml after the route versions they name, runs/LATEST
after its run. An object store shows an object whole or not at all, so a push cut short leaves
the bucket as a crash at that point would leave a local folder. Deletions go last. Temporary
files, staging folders and the lock stay local. Training checkpoints are pushed mid-stage, each as
soon as it is saved (its trainer state last), so that fine-tuning resumes on another machine;
the adapter's stage deletes them when it is done.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipeline.store import contained

MANIFEST = ".slm-convert.mirror.json"
MANIFEST_SAVE_SECONDS = 5.0  # how often a long push records its progress
# The order in which a push uploads the files that commit what came before them.
COMMIT_FILES = ("raw/ledger.sqlite", "registry/history.jsonl", "registry/router.yaml", "registry/runs/LATEST")


def is_remote(location: str) -> bool:
    """True for a URL of a filesystem other than the local one."""
    return "://" in location and not location.startswith("file://")


def local_copy(url: str, work_dir: Path) -> Path:
    """The folder under `work_dir` that holds the local copy of `url` (one per URL)."""
    return Path(work_dir) / hashlib.sha256(url.encode()).hexdigest()[:16]


def kept_local(relative: str) -> bool:
    """Files that never go to the bucket: locks, temporary files, staging folders. (Training
    checkpoints do go: a fine-tuning step that lost its machine resumes from them on another.)"""
    parts = relative.split("/")
    return parts[-1].startswith(".slm-convert.") or any(p.endswith((".tmp", ".partial")) or p == "_staging" for p in parts)


def _version(info: dict[str, Any]) -> str:
    """What changes when an object is rewritten: its ETag where the store has one."""
    for key in ("ETag", "etag", "md5Hash", "checksum"):
        if info.get(key):
            return str(info[key]).strip('"')
    return f"{info.get('size')}:{info.get('mtime') or info.get('LastModified') or info.get('created')}"


@dataclass
class Mirror:
    """The bucket folder `url` and its local copy `local`."""

    url: str
    local: Path

    def __post_init__(self):
        import fsspec

        self.refused: set[str] = set()  # keys a pull refused (see `contained`)

        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
        except (ImportError, ValueError) as err:
            raise RuntimeError(f"cannot open {self.url}: {err} (install the filesystem's package, e.g. "
                               "`pip install -e '.[s3]'` for s3:// URLs)") from err
        self.root = self.root.rstrip("/")

    # -- what is where --------------------------------------------------------------------------

    def _manifest(self) -> dict[str, dict]:
        path = self.local / MANIFEST
        return json.loads(path.read_text()) if path.exists() else {}

    def _save_manifest(self, manifest: dict[str, dict]) -> None:
        from pipeline.store import write_json  # atomic

        write_json(self.local / MANIFEST, manifest)

    def _remote_files(self) -> dict[str, dict]:
        try:
            found = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            return {}
        prefix = self.root + "/"
        return {name[len(prefix):]: info for name, info in found.items() if name.startswith(prefix)}

    def _local_files(self, folder: str = "") -> dict[str, os.stat_result]:
        """The files to mirror, by path relative to the local copy; only those under `folder`."""
        if not (self.local / folder).is_dir():
            return {}
        files = {}
        for path in (self.local / folder).rglob("*"):
            relative = path.relative_to(self.local).as_posix()
            if path.is_file() and not kept_local(relative):
                files[relative] = path.stat()
        return files

    @staticmethod
    def _stamp(stat: os.stat_result) -> dict:
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}

    # -- the two directions ---------------------------------------------------------------------

    def pull(self, log: Callable[[str], None] = lambda message: None) -> int:
        """Bring the local copy up to the bucket: download new and changed objects, delete local
        files whose objects are gone. Returns the number of files changed."""
        self.local.mkdir(parents=True, exist_ok=True)
        manifest, remote, local = self._manifest(), self._remote_files(), self._local_files()
        changed = 0
        for relative, info in sorted(remote.items()):
            known = manifest.get(relative)
            unchanged_here = relative in local and known and self._stamp(local[relative]) == known["local"]
            if known and known["remote"] == _version(info) and unchanged_here:
                continue
            target = contained(self.local, relative)
            if target is None:  # refused, and said every time: someone wrote an object where none belongs
                log(f"refused to pull {self.root}/{relative}: its key leads outside {self.local}")
                self.refused.add(relative)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.pull.tmp")
            self.fs.get_file(f"{self.root}/{relative}", str(partial))
            os.replace(partial, target)
            manifest[relative] = {"remote": _version(info), "local": self._stamp(target.stat())}
            changed += 1
        for relative in sorted(set(manifest) - set(remote)):
            if relative in local and contained(self.local, relative) is not None and self._stamp(local[relative]) == manifest[relative]["local"]:
                (self.local / relative).unlink()
                changed += 1
            manifest.pop(relative)
        self._save_manifest(manifest)
        if changed:
            log(f"pulled {changed} changed file(s) from {self.url}")
        return changed

    def push(self, log: Callable[[str], None] = lambda message: None, folder: str = "") -> int:
        """Bring the bucket up to the local copy: upload new and changed files (commit files
        last), then delete objects whose files are gone. Returns the number of objects changed.
        `folder` (relative): only what is under it, e.g. a training checkpoint just saved."""
        manifest, local = self._manifest(), self._local_files(folder)
        under = folder.rstrip("/") + "/" if folder else ""
        changed_files = [r for r, stat in local.items() if manifest.get(r, {}).get("local") != self._stamp(stat)]
        order = {name: position for position, name in enumerate(COMMIT_FILES, start=1)}
        # a checkpoint counts as complete once its trainer state is there: that file goes last
        changed_files.sort(key=lambda r: (order.get(r, 0), r.endswith("/trainer_state.json"), r))
        saved_at = time.monotonic()
        for relative in changed_files:
            remote = f"{self.root}/{relative}"
            self.fs.put_file(str(self.local / relative), remote)
            manifest[relative] = {"remote": _version(self.fs.info(remote)), "local": self._stamp(local[relative])}
            # every few seconds, not after each object (a run's thousands of files would rewrite
            # it thousands of times): a push cut short resumes from there, uploading again at
            # most those seconds' objects, which is harmless
            if time.monotonic() - saved_at > MANIFEST_SAVE_SECONDS:
                self._save_manifest(manifest)
                saved_at = time.monotonic()
        gone = sorted(r for r in set(manifest) - set(local) if r.startswith(under))
        for relative in gone:
            with suppress(FileNotFoundError):  # gone there too
                self.fs.rm_file(f"{self.root}/{relative}")
            manifest.pop(relative)
        self._save_manifest(manifest)
        if changed_files or gone:
            log(f"pushed {len(changed_files)} file(s) to {self.url}, deleted {len(gone)}")
        return len(changed_files) + len(gone)
