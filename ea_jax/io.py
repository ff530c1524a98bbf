"""Files that survive a crash: atomic writes, append-only JSONL journals, config hashes."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def _json_default(value):
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    # tolist() turns numpy and JAX arrays of any shape, scalars included, into Python values.
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def to_json(value: Any, indent: int | None = 2) -> str:
    return json.dumps(value, indent=indent, default=_json_default, ensure_ascii=False, sort_keys=False)


def atomic_write_text(path: Path, text: str) -> None:
    """Write UTF-8 text via a temporary file in the same folder and rename, so readers never see half a file."""
    if not isinstance(text, str):
        raise TypeError(f"text must be str, not {type(text).__name__}")
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_text(path, to_json(value) + "\n")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder and rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def replace_directory(staging: Path, target: Path) -> None:
    """Move a fully written staging folder into place, replacing any older target."""
    staging, target = Path(staging), Path(target)
    if target.exists():
        backup = target.with_name(target.name + ".old")
        shutil.rmtree(backup, ignore_errors=True)
        os.replace(target, backup)
        os.replace(staging, target)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(staging, target)


def append_jsonl(path: Path, records: Iterable[dict]) -> None:
    """Append records and fsync, so a crash loses at most the line being written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        for record in records:
            handle.write(to_json(record, indent=None) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_journal(path: Path, key: str = "id") -> dict[str, dict]:
    """Read an append-only JSONL journal into {record[key]: record}.

    A last line cut short by a crash is dropped with a warning; a malformed line anywhere
    else means the file was edited or corrupted, which raises. A repeated key keeps the
    first record, so a batch re-appended after a crash adds nothing twice.
    """
    path = Path(path)
    if not path.exists():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines()
    records: dict[str, dict] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):
                logger.warning("%s: dropping a partial last line (%s); it will be regenerated", path, error)
                _truncate_last_line(path)
                continue
            raise ValueError(
                f"{path}:{number} is not valid JSON ({error}); the journal is corrupt. "
                "Delete the file to regenerate this stage"
            ) from error
        records.setdefault(str(record[key]), record)
    return records


def _truncate_last_line(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    keep = text.rstrip("\n").rfind("\n")
    atomic_write_text(path, text[: keep + 1] if keep >= 0 else "")


def config_hash(value: Any) -> str:
    """Stable short hash of a JSON-serialisable value, used to tell whether a stage is stale."""
    return hashlib.sha256(to_json(value, indent=None).encode()).hexdigest()[:16]
