"""Small shared helpers for orchestration code: errors that name their input, atomic publishing,
and the ``errors.jsonl`` failure log that long jobs append to instead of stopping."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator


class InputError(ValueError):
    """Bad user input. ``str(err)`` always names the input and the reason."""

    def __init__(self, input: Any, reason: str):
        self.input = str(input)
        self.reason = reason
        super().__init__(f"{self.input}: {reason}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".partial") -> Iterator[Path]:
    """Yield a temporary path in the destination's directory; on success rename it onto ``path``.

    The rename is atomic on one filesystem, so readers see either nothing or the whole file. On any
    exception the temporary file is removed and nothing is published.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())          # mkstemp makes 0600; publish with the usual permissions
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def config_hash(obj: Any) -> str:
    """Stable short hash of a JSON-serialisable config (key order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class ErrorLog:
    """Append-only ``errors.jsonl``: one JSON line per failed input, written and flushed at once.

    Long jobs record a failure here and carry on with the rest; ``count`` says how many failed.
    """

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path is not None else None
        self.count = 0
        self.records: list[dict] = []

    def record(self, input: Any, reason: str | BaseException, **extra: Any) -> dict:
        if isinstance(reason, BaseException):
            reason = reason.reason if isinstance(reason, InputError) else f"{type(reason).__name__}: {reason}"
        rec = {"input": str(input), "reason": str(reason), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        rec.update(extra)
        self.count += 1
        self.records.append(rec)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
        return rec
