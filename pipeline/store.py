"""Where each stage keeps what it wrote, and writes that a crash can never leave half done."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


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


def _atomic_target(path: Path) -> tuple[int, str]:
    """A temporary file beside `path`; mkstemp creates it readable by its owner only (0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")


def write_bytes(path: Path, payload: bytes) -> None:
    """Write bytes atomically to an owner-only (0600) file."""
    fd, tmp = _atomic_target(path)
    with os.fdopen(fd, "wb") as f:
        f.write(payload)
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    fd, tmp = _atomic_target(path)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def write_table(path: Path, frame: pd.DataFrame, schema: pa.Schema | None = None) -> None:
    """Write a Parquet table atomically (temporary file, then rename)."""
    table = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
    fd, tmp = _atomic_target(path)
    os.close(fd)
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def read_table(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: materialize the upstream asset that writes it first"
        )
    return pq.read_table(path).to_pandas()
