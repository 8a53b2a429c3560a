"""Writing and reading label shards (webdataset tars of schema v1 samples, see ``pipeline.schema``).

Writer: ``ShardWriter`` wraps ``webdataset.ShardWriter``. Each shard is written under a hidden temporary
name (``.<prefix>-000000.tar.partial``), and only when it is closed is it renamed to ``<prefix>-000000.tar``
(atomic on one filesystem), its entry added to the index ``<prefix>.index.json`` and ``on_shard_closed``
called — in that order, so a ledger written from the callback never names a shard that is not complete.
Tar headers are fixed (mtime 0, uid/gid 0, owner ``flowdistill``, mode 0444), members are sorted, and the
sample encoding is deterministic, so the same samples always give the same bytes.

Reader: ``iter_samples`` streams members with ``webdataset.tariterators.tar_file_iterator`` and groups
them strictly (no dot-less names, no duplicate or interleaved keys), checks that every shard ends with the
tar end-of-archive marker (so a shard cut at a member boundary is not read as a shorter valid one), and
decodes + validates every sample; anything wrong raises ``InputError("<shard>:<key>", reason)``.
"""
from __future__ import annotations

import contextlib
import glob as globmod
import hashlib
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .common import InputError, atomic_write_json
from .schema import SCHEMA_VERSION, LabelSample, decode_sample, encode_sample

TAR_MTIME = 0
TAR_USER = "flowdistill"
TAR_GROUP = "flowdistill"
TAR_MODE = 0o444
INDEX_KIND = "flowdistill-shard-index"
_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


class _HashingFile:
    """Write-only file wrapper counting bytes and hashing them as they are written (tarfile only writes)."""

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "wb")
        self.sha = hashlib.sha256()
        self.nbytes = 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.nbytes += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        if not self.f.closed:
            try:
                self.f.flush()
                os.fsync(self.f.fileno())
            finally:                     # a failed flush (disk full) must not leak the handle
                self.f.close()


def shard_name(prefix: str, number: int) -> str:
    """``labels-0``, 3 → ``labels-0-000003.tar``."""
    return f"{prefix}-{number:06d}.tar"


def index_path_for(out_dir: str | os.PathLike, prefix: str) -> Path:
    """Where a writer with ``prefix`` keeps its index: ``<out_dir>/<prefix>.index.json``."""
    return Path(out_dir) / f"{prefix}.index.json"


class ShardWriter:
    """Validate, encode and write LabelSamples into atomically published, byte-reproducible shards.

    ``with ShardWriter(out_dir, prefix="labels-0") as w: w.write(sample)`` publishes
    ``out_dir/labels-0-000000.tar``, ``-000001.tar`` … (a new shard after ``maxcount`` samples or
    ``maxsize`` payload bytes). An exception inside the ``with`` block (or ``abort()``) removes the open
    shard's temporary file; shards closed before it stay published and indexed. Empty shards are never
    published. A shard name that already exists is refused unless ``overwrite=True``.

    ``closed_shards``: index entries ``{shard, samples, sha256, bytes, keys}`` of the shards this writer
    published, in order. ``on_shard_closed(entry)`` runs after the rename and the index update.
    """

    def __init__(self, out_dir: str | os.PathLike, prefix: str = "labels-0", maxcount: int = 1000,
                 maxsize: float = 1e9, image_format: str = "jpg", quality: int = 95, *, start_shard: int = 0,
                 on_shard_closed: Callable[[dict], None] | None = None, index: bool = True,
                 overwrite: bool = False):
        import webdataset as wds

        if not isinstance(prefix, str) or not _PREFIX_RE.match(prefix):
            raise InputError(repr(prefix), "shard prefix must be non-empty [A-Za-z0-9_-], not starting with - or _")
        if image_format not in ("jpg", "png"):
            raise InputError(image_format, "image format must be jpg or png")
        if int(maxcount) < 1 or float(maxsize) <= 0:
            raise InputError(f"maxcount={maxcount}, maxsize={maxsize}", "must be positive")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.image_format = image_format
        self.quality = int(quality)
        self.maxcount = int(maxcount)
        self.maxsize = float(maxsize)
        self.on_shard_closed = on_shard_closed
        self.index_path = index_path_for(self.out_dir, prefix) if index else None
        self.overwrite = overwrite
        self.closed_shards: list[dict] = []
        self._seen: set[str] = set()    # keys written by this writer (a duplicate key is an error)
        self._keys: list[str] = []      # keys of the open shard
        self._file: _HashingFile | None = None
        self._aborting = False
        self._closed = False
        # webdataset %-formats the pattern with the shard number: escape any % in the directory
        pattern = os.path.join(str(self.out_dir).replace("%", "%%"), f".{prefix}-%06d.tar.partial")
        self._wds = wds.ShardWriter(pattern, maxcount=self.maxcount, maxsize=self.maxsize, post=self._post,
                                    start_shard=int(start_shard), verbose=0, opener=self._open,
                                    user=TAR_USER, group=TAR_GROUP, mode=TAR_MODE, mtime=TAR_MTIME,
                                    encoder=False, format="USTAR_FORMAT")

    # -- paths
    def _final(self, temp: str | os.PathLike) -> Path:
        temp = Path(temp)
        return temp.with_name(temp.name[1:-len(".partial")])

    def _next_name(self) -> str:
        """Name of the shard the next sample will land in (mirrors webdataset's rotation rule)."""
        w = self._wds
        if w.tarstream is None or w.count >= w.maxcount or w.size >= w.maxsize:
            return shard_name(self.prefix, w.shard)
        return self._final(w.fname).name

    # -- webdataset hooks
    def _open(self, temp_name: str) -> _HashingFile:
        final = self._final(temp_name)
        if final.exists() and not self.overwrite:
            raise InputError(final, "shard already exists (use start_shard= after the last shard, or overwrite=True)")
        self._keys = []
        self._file = _HashingFile(Path(temp_name))
        return self._file

    def _post(self, temp_name: str) -> None:
        f, self._file = self._file, None
        temp = Path(temp_name)
        if f is not None:
            f.close()
        if self._aborting or not self._keys:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
            return
        final = self._final(temp)
        os.replace(temp, final)
        _fsync_dir(final.parent)
        entry = {"shard": final.name, "samples": len(self._keys), "sha256": f.sha.hexdigest(),
                 "bytes": f.nbytes, "keys": list(self._keys)}
        self.closed_shards.append(entry)
        if self.index_path is not None:
            merged = {e["shard"]: e for e in (read_index(self.index_path) if self.index_path.exists() else [])}
            merged[entry["shard"]] = entry
            write_index(self.index_path, list(merged.values()))
        if self.on_shard_closed is not None:
            self.on_shard_closed(dict(entry))

    # -- public
    def write(self, sample: LabelSample) -> None:
        """Validate ``sample`` (InputError naming the shard and key) and append it to the current shard."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        where = str(self.out_dir / self._next_name())
        enc = encode_sample(sample, self.image_format, self.quality, where=where, validate=True)
        if sample.key in self._seen:
            raise InputError(f"{where}:{sample.key}", "duplicate key (already written by this writer)")
        self._wds.write(enc)
        self._seen.add(sample.key)
        self._keys.append(sample.key)

    @property
    def open_samples(self) -> int:
        """Samples in the shard being written (not yet published)."""
        return len(self._keys) if self._wds.tarstream is not None else 0

    def end_shard(self) -> None:
        """Close and publish the open shard now (if it has samples); the next ``write`` starts a new one. Lets a
        caller close shards only at work-unit boundaries (construct with a large ``maxcount``)."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        self._wds.finish()

    def close(self) -> list[dict]:
        """Close and publish the open shard (if it has samples); returns ``closed_shards``."""
        if not self._closed:
            self._closed = True
            self._wds.close()
        return self.closed_shards

    def abort(self) -> None:
        """Drop the open shard: its temporary file is removed and nothing more is published."""
        if self._closed:
            return
        self._closed = True
        self._aborting = True
        try:
            self._wds.close()
        except Exception:
            pass
        finally:
            if self._file is not None:  # the tar stream failed before post ran
                with contextlib.suppress(Exception):
                    self._file.close()
                with contextlib.suppress(FileNotFoundError):
                    self._file.path.unlink()
                self._file = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------------------------- index

def write_index(path: str | os.PathLike, entries: list[dict]) -> None:
    """Write the shard index atomically: ``{kind, schema_version, shards: [entries sorted by shard]}``."""
    for e in entries:
        _check_entry(e, str(path))
    atomic_write_json(path, {"kind": INDEX_KIND, "schema_version": SCHEMA_VERSION,
                             "shards": sorted(entries, key=lambda e: e["shard"])})


def _check_entry(e, where: str) -> None:
    if not isinstance(e, dict):
        raise InputError(where, f"index entry must be a dict, got {type(e).__name__}")
    name = e.get("shard")
    ok = (isinstance(name, str) and name.endswith(".tar") and "/" not in name
          and isinstance(e.get("samples"), int) and e["samples"] >= 0
          and isinstance(e.get("bytes"), int) and e["bytes"] >= 0
          and isinstance(e.get("sha256"), str) and _SHA_RE.match(e["sha256"])
          and isinstance(e.get("keys"), list) and len(e["keys"]) == e["samples"])
    if not ok:
        raise InputError(where, f"malformed index entry for {name!r} (needs shard, samples, sha256, bytes, keys)")


def read_index(path: str | os.PathLike) -> list[dict]:
    """Read and check an index written by ``write_index``; returns its entries."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(p, "index file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(p, f"unreadable index: {e}") from None
    if not isinstance(data, dict) or data.get("kind") != INDEX_KIND or not isinstance(data.get("shards"), list):
        raise InputError(p, f"not a shard index (expected kind {INDEX_KIND!r} and a shards list)")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise InputError(p, f"index schema_version {data.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    for e in data["shards"]:
        _check_entry(e, str(p))
    return data["shards"]


def verify_shard(path: str | os.PathLike, entry: dict) -> None:
    """Check a shard file against its index entry (size and sha256); InputError naming the shard if not."""
    from .common import sha256_file

    p = Path(path)
    if not p.is_file():
        raise InputError(p, "shard listed in the index is missing")
    size = p.stat().st_size
    if size != entry["bytes"]:
        raise InputError(p, f"size {size} bytes, index says {entry['bytes']}")
    digest = sha256_file(p)
    if digest != entry["sha256"]:
        raise InputError(p, f"sha256 {digest[:12]}… differs from the index ({entry['sha256'][:12]}…)")


# -------------------------------------------------------------------------------------------- reading

def _is_shard_file(p: Path) -> bool:
    return p.is_file() and p.name.endswith(".tar") and not p.name.startswith(".")


def list_shards(path: str | os.PathLike | Iterable) -> list[str]:
    """Resolve shard locations to a list of existing files.

    ``path`` may be a directory (its ``*.tar``, sorted, hidden temporaries excluded), a file, a brace
    pattern (``labels-0-{000000..000003}.tar``), a glob, several of these joined by ``::``, or a list.
    """
    if isinstance(path, (list, tuple)):
        out: list[str] = []
        for p in path:
            out.extend(list_shards(p))
        return out
    text = os.fspath(path)
    if "::" in text:
        return list_shards(text.split("::"))
    p = Path(text)
    if p.is_dir():
        found = sorted(str(q) for q in p.iterdir() if _is_shard_file(q))
        if not found:
            raise InputError(p, "directory holds no .tar shards")
        return found
    if p.is_file():
        return [text]
    if "{" in text:
        import braceexpand

        out = list(braceexpand.braceexpand(text))
        for q in out:
            if not Path(q).is_file():
                raise InputError(q, f"shard not found (from pattern {text})")
        return out
    if globmod.has_magic(text):
        found = sorted(q for q in globmod.glob(text) if _is_shard_file(Path(q)))
        if not found:
            raise InputError(text, "pattern matches no .tar shards")
        return found
    raise InputError(text, "no such shard, directory or pattern")


def check_tar_complete(path: str | os.PathLike) -> int:
    """Check that a tar ends with its end-of-archive marker; returns the member count.

    A tar cut exactly at a member boundary reads as a shorter valid archive; the two zero blocks that
    ``tarfile`` writes on close are what distinguish a complete shard.
    """
    p = Path(path)
    size = p.stat().st_size
    if size == 0:
        raise InputError(p, "empty file, not a tar")
    n, end = 0, 0
    try:
        with tarfile.open(p, "r:") as tf:
            for m in tf:
                n += 1
                end = m.offset_data + ((m.size + 511) // 512) * 512
    except tarfile.TarError as e:
        raise InputError(p, f"corrupt tar: {e}") from None
    if end + 1024 > size:
        raise InputError(p, f"truncated tar: {size} bytes, member data runs to {end}, no end-of-archive marker")
    with open(p, "rb") as f:
        f.seek(end)
        if f.read(1024).strip(b"\0"):
            raise InputError(p, f"corrupt tar: garbage after the last member at byte {end}")
    return n


def iter_raw(shard: str | os.PathLike) -> Iterator[dict]:
    """Raw webdataset samples of one shard: ``{__key__, __url__, <ext>: bytes …}``, strictly grouped."""
    from webdataset.tariterators import base_plus_ext, tar_file_iterator

    shard = os.fspath(shard)
    check_tar_complete(shard)
    seen: set[str] = set()
    current: dict | None = None
    with open(shard, "rb") as f:
        members = tar_file_iterator(f, skip_meta=None)
        while True:
            try:
                item = next(members)
            except StopIteration:
                break
            except Exception as e:  # tarfile/zlib errors, re-raised by webdataset with the stream appended
                msg = str(e.args[0]) if e.args else type(e).__name__
                raise InputError(shard, f"corrupt tar: {msg}") from None
            fname = item["fname"]
            key, ext = base_plus_ext(fname)
            if key is None:
                raise InputError(shard, f"member {fname!r} has no extension (key.ext)")
            if current is None or key != current["__key__"]:
                if current is not None:
                    yield current
                if key in seen:
                    raise InputError(f"{shard}:{key}", "key appears twice / its members are not contiguous")
                seen.add(key)
                current = {"__key__": key, "__url__": shard}
            ext = ext.lower()
            if ext in current:
                raise InputError(f"{shard}:{key}", f"duplicate member {ext}")
            current[ext] = item["data"]
    if current is not None:
        yield current


def iter_samples(urls: str | os.PathLike | list, validate: bool = True) -> Iterator[LabelSample]:
    """Decoded LabelSamples from shards in order (``list_shards`` resolves ``urls``).

    Every sample is decoded and (with ``validate``) checked against schema v1; InputError
    ``"<shard>:<key>"`` on the first malformed one, ``"<shard>"`` for a corrupt or truncated tar.
    """
    for shard in list_shards(urls):
        for raw in iter_raw(shard):
            yield decode_sample(raw, shard, validate=validate)


def rewrite_shards(urls: str | os.PathLike | list, out_dir: str | os.PathLike, prefix: str = "labels-0",
                   maxcount: int = 1000, maxsize: float = 1e9, image_format: str = "jpg", **kw) -> list[dict]:
    """Read shards and write their samples again (validated; image bytes pass through unchanged)."""
    with ShardWriter(out_dir, prefix, maxcount=maxcount, maxsize=maxsize, image_format=image_format, **kw) as w:
        for s in iter_samples(urls):
            w.write(s)
    return w.closed_shards
