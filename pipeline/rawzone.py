"""The raw zone: traces as logged, before scrubbing. Encrypted at rest, owner-readable only.

Raw tables (the trace table and the quarantine, whose excerpts hold raw text) are written as
Parquet encrypted with Fernet (`cryptography`; AES in CBC mode with an HMAC-SHA256 tag) under
a key from the environment, to files of mode 0600. Fields that say who made a call are replaced
by keyed HMAC-SHA256 pseudonyms before anything is stored: calls of one session still group
together, but the stored data no longer names the session.

    python -m pipeline.rawzone new-keys     prints a fresh pair of keys as environment lines
"""

from __future__ import annotations

import hashlib
import hmac
import io
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.store import write_bytes

ENCRYPTION_KEY_ENV = "SLM_RAW_ENCRYPTION_KEY"
PSEUDONYM_KEY_ENV = "SLM_PSEUDONYM_KEY"
ENCRYPTED_SUFFIX = ".enc"


class RawZoneKeyError(RuntimeError):
    """A raw-zone key is missing or wrong; the message says which and what to do."""


def _fernet(key: str):
    from cryptography.fernet import Fernet

    try:
        return Fernet(key.encode() if isinstance(key, str) else key)
    except (ValueError, TypeError) as err:
        raise RawZoneKeyError(
            f"{ENCRYPTION_KEY_ENV} is not a Fernet key (32 url-safe base64-encoded bytes); "
            "make one with `python -m pipeline.rawzone new-keys`"
        ) from err


def encrypted_path(path: Path) -> Path:
    return path.with_name(path.name + ENCRYPTED_SUFFIX)


def stored_path(path: Path) -> Path:
    """The file a raw table was stored in: its encrypted form if there is one."""
    return encrypted_path(path) if encrypted_path(path).exists() else path


def write_raw_table(path: Path, frame: pd.DataFrame, schema: pa.Schema, encryption_key: str | None) -> Path:
    """Store a raw table, encrypted when a key is given. Returns the file written.

    The other form of the same table (plain or encrypted) is removed, so no stale copy stays.
    """
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame, schema=schema, preserve_index=False), buffer)
    payload = buffer.getvalue()
    target, stale = (encrypted_path(path), path) if encryption_key else (path, encrypted_path(path))
    if encryption_key:
        payload = _fernet(encryption_key).encrypt(payload)
    write_bytes(target, payload)  # atomic, mode 0600
    stale.unlink(missing_ok=True)
    return target


def read_raw_table(path: Path, encryption_key: str | None) -> pd.DataFrame:
    """Read a raw table in whichever form it was stored."""
    from cryptography.fernet import InvalidToken

    sealed = encrypted_path(path)
    if sealed.exists():
        if not encryption_key:
            raise RawZoneKeyError(f"{sealed} is encrypted: set {ENCRYPTION_KEY_ENV} to the key it was written with")
        try:
            payload = _fernet(encryption_key).decrypt(sealed.read_bytes())
        except InvalidToken as err:
            raise RawZoneKeyError(f"{sealed} cannot be decrypted with the key in {ENCRYPTION_KEY_ENV}") from err
        return pq.read_table(io.BytesIO(payload)).to_pandas()
    if path.exists():
        return pq.read_table(path).to_pandas()
    raise FileNotFoundError(f"{path} does not exist: materialize the upstream asset that writes it first")


def pseudonymize(values: pd.Series, key: str) -> pd.Series:
    """Keyed pseudonyms: equal inputs map to equal outputs; without the key nothing maps back."""
    secret = key.encode()

    def one(value):
        if value is None or (isinstance(value, float) and pd.isna(value)):
            return None
        digest = hmac.new(secret, str(value).encode("utf-8"), hashlib.sha256).hexdigest()
        return f"anon-{digest[:20]}"

    return values.map(one)


def new_keys() -> dict[str, str]:
    import secrets

    from cryptography.fernet import Fernet

    return {ENCRYPTION_KEY_ENV: Fernet.generate_key().decode(), PSEUDONYM_KEY_ENV: secrets.token_urlsafe(32)}


if __name__ == "__main__":
    if sys.argv[1:] != ["new-keys"]:
        sys.exit("usage: python -m pipeline.rawzone new-keys")
    for name, value in new_keys().items():
        print(f"{name}={value}")
