"""Label sets, versions, ledgers and manifests — the one module that owns the on-disk layout of a label set.

::

    <root>/<set>/
      LATEST                      "v0002\\n": the newest *complete* version (replaced atomically)
      v0001/
        version.json              identity + the exact teacher / tracer / sampling settings (written once)
        labels-<r>-000000.tar     shards of rank r (webdataset, schema v1; published by rename when closed)
        labels-<r>.index.json     per-prefix shard index: shard, samples, sha256, bytes, keys (pipeline.shards)
        ledger-<r>.jsonl          finished work units, appended only after their samples are in closed shards
        errors-<r>.jsonl          failed work units with the reason (pipeline.common.ErrorLog lines)
        summary-<r>.json          the rank's last run: pairs/s, queries/s, fraction of time in the model
        manifest.json             written when every work unit is done or failed: all shards, counts
        errors.jsonl              all ranks' failures + the sources' errors, merged (written with manifest.json)

A version's identity is (teacher id, tracer config hash, sampling config hash); ``resolve_version`` finds the
version with the caller's identity or creates the next one (a directory renamed into place, so concurrent ranks
agree on one). A work unit (one video, id = ``VideoItem.id``) is *done* when a ledger line names it or when a
closed, indexed shard holds one of its samples (the ledger is reconciled from the indexes, so a kill between a
shard's rename and its ledger line loses nothing and duplicates nothing). Shard files that no index names
(a kill between rename and index update) and ``.partial`` files are removed by ``clean_prefix`` before a rank
writes that prefix again; their units are not done, so they are labelled again.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Iterable

from .common import InputError, atomic_write_json, atomic_write_text, config_hash
from .schema import parse_key
from .shards import index_path_for, read_index

VERSION_FORMAT = "flowdistill-label-version-v1"
MANIFEST_FORMAT = "flowdistill-label-manifest-v1"
CONTENT_EXCLUDED = ("rank", "created")
_VERSION_RE = re.compile(r"^v(\d{4,})$")
_SET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_SHARD_RE = re.compile(r"^labels-(\d+)-(\d{6})\.tar$")
_PARTIAL_RE = re.compile(r"^\.labels-(\d+)-(\d{6})\.tar\.partial$")


# ----------------------------------------------------------------------------------------------- identity

def identity(teacher_id: str, tracer: dict, sampling: dict) -> dict:
    """A version's identity: the teacher id and the hashes of the tracer and sampling settings."""
    return {"teacher_id": str(teacher_id), "tracer_hash": config_hash(tracer), "sampling_hash": config_hash(sampling)}


def prefix_for(rank: int) -> str:
    return f"labels-{int(rank)}"


def version_name(n: int) -> str:
    return f"v{int(n):04d}"


def set_dir(root: str | os.PathLike, name: str) -> Path:
    if not isinstance(name, str) or not _SET_RE.match(name):
        raise InputError(f"label set {name!r}", "name must be [A-Za-z0-9_-] and start with a letter or digit")
    return Path(root) / name


def list_versions(sdir: str | os.PathLike) -> list[str]:
    """Version directories with a version.json, oldest first."""
    sdir = Path(sdir)
    if not sdir.is_dir():
        return []
    out = [(int(m.group(1)), p.name) for p in sdir.iterdir()
           if (m := _VERSION_RE.match(p.name)) and (p / "version.json").is_file()]
    return [name for _, name in sorted(out)]


def read_json(path: Path, fmt: str | None = None) -> dict:
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "not found") from None
    except (OSError, ValueError) as e:
        raise InputError(path, f"unreadable JSON: {e}") from None
    if not isinstance(obj, dict) or (fmt is not None and obj.get("format") != fmt):
        raise InputError(path, f"not a {fmt} file")
    return obj


def read_version(vdir: str | os.PathLike) -> dict:
    return read_json(Path(vdir) / "version.json", VERSION_FORMAT)


def latest(sdir: str | os.PathLike) -> str | None:
    """The version LATEST names (None before any version completed)."""
    p = Path(sdir) / "LATEST"
    if not p.is_file():
        return None
    name = p.read_text(encoding="utf-8").strip()
    if not _VERSION_RE.match(name) or not (Path(sdir) / name / "version.json").is_file():
        raise InputError(p, f"names {name!r}, which is not a version of this label set")
    return name


def find_version(sdir: str | os.PathLike, ident: dict) -> str | None:
    """The newest version whose identity equals ``ident``."""
    for name in reversed(list_versions(sdir)):
        if read_version(Path(sdir) / name).get("identity") == ident:
            return name
    return None


def resolve_version(sdir: str | os.PathLike, ident: dict, settings: dict, *, base: str | None = None,
                    create: bool = True) -> tuple[str | None, bool]:
    """(version name, created) for ``ident``: the existing version with that identity, else (``create``) the next
    number, published by renaming a fully written temporary directory (safe when ranks race: the loser finds the
    winner's version and uses it when the identities match)."""
    sdir = Path(sdir)
    for _ in range(100):
        found = find_version(sdir, ident)
        if found is not None or not create:
            return found, False
        nums = [int(_VERSION_RE.match(v).group(1)) for v in list_versions(sdir)]
        taken = [int(m.group(1)) for p in (sdir.iterdir() if sdir.is_dir() else []) if (m := _VERSION_RE.match(p.name))]
        name = version_name(max(nums + taken + [0]) + 1)
        tmp = sdir / f".{name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
        info = {"format": VERSION_FORMAT, "set": sdir.name, "version": name, "identity": ident, "base": base,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **settings}
        try:
            sdir.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            atomic_write_json(tmp / "version.json", info)
        except OSError as e:          # read-only, full, or a file where a directory should be
            with contextlib.suppress(OSError):
                tmp.rmdir()
            raise InputError(sdir, f"cannot create a label-set version here (output directory not writable): "
                                   f"{e.strerror or e}") from None
        try:
            os.rename(tmp, sdir / name)
            return name, True
        except OSError:               # another rank published this number first: look again
            with contextlib.suppress(OSError):
                (tmp / "version.json").unlink()
                tmp.rmdir()
            time.sleep(0.05)
    raise InputError(sdir, "could not create a new version (too many concurrent attempts)")


# ----------------------------------------------------------------------------------------------- ledger

def _read_jsonl(path: Path) -> list[dict]:
    """JSON lines; a torn last line (a writer killed mid-write) is ignored, any other bad line is an error."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    lines = text.split("\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:          # no newline after it: torn by a kill
                continue
            raise InputError(f"{path}:{i + 1}", "not a JSON line") from None
        if isinstance(rec, dict):
            out.append(rec)
    return out


def append_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Append records as JSON lines in one write, flushed and fsynced; starts on a fresh line if the file ends
    with a torn line."""
    path = Path(path)
    data = "".join(json.dumps(r, sort_keys=True, separators=(",", ":")) + "\n" for r in records)
    if not data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                data = "\n" + data
        f.write(data.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def ledger_path(vdir: Path, rank: int) -> Path:
    return Path(vdir) / f"ledger-{int(rank)}.jsonl"


def errors_path(vdir: Path, rank: int) -> Path:
    return Path(vdir) / f"errors-{int(rank)}.jsonl"


def index_files(vdir: Path) -> list[Path]:
    return sorted(Path(vdir).glob("labels-*.index.json"))


def shard_entries(vdir: str | os.PathLike) -> list[dict]:
    """Index entries of every closed shard of this version (all prefixes), sorted by shard name."""
    out = []
    for p in index_files(Path(vdir)):
        out.extend(read_index(p))
    return sorted(out, key=lambda e: e["shard"])


def read_state(vdir: str | os.PathLike) -> dict:
    """{"done": {unit: record}, "failed": {unit: record}, "shards": [entries]} over all ranks' files.
    A unit with samples in an indexed shard is done even if its ledger line was never written."""
    vdir = Path(vdir)
    done: dict[str, dict] = {}
    for p in sorted(vdir.glob("ledger-*.jsonl")):
        for rec in _read_jsonl(p):
            if rec.get("status") == "done" and isinstance(rec.get("unit"), str):
                done.setdefault(rec["unit"], rec)
    shards = shard_entries(vdir)
    for e in shards:
        for key in e["keys"]:
            unit = parse_key(key)[0]
            done.setdefault(unit, {"unit": unit, "status": "done", "recovered_from": e["shard"]})
    failed: dict[str, dict] = {}
    for p in sorted(vdir.glob("errors-*.jsonl")):
        for rec in _read_jsonl(p):
            unit = rec.get("unit")
            if isinstance(unit, str) and unit not in done:
                failed[unit] = rec
    return {"done": done, "failed": failed, "shards": shards}


# ----------------------------------------------------------------------------------------------- shards

def clean_prefix(vdir: str | os.PathLike, rank: int) -> dict:
    """Remove what a killed writer of prefix ``labels-<rank>`` left: ``.partial`` temporaries and shard files no
    index names. Returns {"partial": n, "orphans": n, "next_shard": number for the next shard}. Only the rank
    that owns the prefix may call this (nobody else writes it)."""
    vdir = Path(vdir)
    prefix = prefix_for(rank)
    idx = index_path_for(vdir, prefix)
    indexed = {e["shard"] for e in read_index(idx)} if idx.exists() else set()
    n_partial = n_orphan = 0
    numbers = [-1]
    for p in vdir.iterdir() if vdir.is_dir() else []:
        m = _PARTIAL_RE.match(p.name)
        if m and int(m.group(1)) == rank:
            p.unlink(missing_ok=True)
            n_partial += 1
            continue
        m = _SHARD_RE.match(p.name)
        if m and int(m.group(1)) == rank:
            if p.name in indexed:
                numbers.append(int(m.group(2)))
            else:
                p.unlink(missing_ok=True)
                n_orphan += 1
    numbers += [int(_SHARD_RE.match(s).group(2)) for s in indexed if _SHARD_RE.match(s)]
    return {"partial": n_partial, "orphans": n_orphan, "next_shard": max(numbers) + 1}


def stale_prefixes(vdir: str | os.PathLike, world: int) -> list[int]:
    """Ranks >= world that left files in this version (a run resumed with fewer ranks): rank 0 cleans them."""
    ranks = set()
    for p in Path(vdir).iterdir() if Path(vdir).is_dir() else []:
        m = _SHARD_RE.match(p.name) or _PARTIAL_RE.match(p.name)
        if m and int(m.group(1)) >= world:
            ranks.add(int(m.group(1)))
    return sorted(ranks)


def sample_content_hash(raw: dict) -> str:
    """sha256 over a raw sample's members (``pipeline.shards.iter_raw`` dicts) with the provenance fields
    ``CONTENT_EXCLUDED`` (producer rank, version creation time) taken out of meta.json: the same key and hash mean
    the same label whichever rank, world size or run wrote it."""
    h = hashlib.sha256()
    for name in sorted(k for k in raw if not k.startswith("__")):
        data = raw[name]
        if name == "meta.json":
            meta = json.loads(data)
            for k in CONTENT_EXCLUDED:
                meta.pop(k, None)
            data = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- completion

def version_shards(sdir: Path, vname: str) -> list[dict]:
    """Shard entries of a version including its base's (``--keep-old``), shard paths relative to the version."""
    vdir = Path(sdir) / vname
    info = read_version(vdir)
    out = [dict(e) for e in shard_entries(vdir)]
    if info.get("base"):
        out = [{**e, "shard": f"../{info['base']}/{e['shard']}"} for e in version_shards(sdir, info["base"])] + out
    return out


def covered_units(sdir: Path, vname: str) -> tuple[dict, dict]:
    """(done, failed) units of a version, a ``--keep-old`` version counting its base's units as its own."""
    vdir = Path(sdir) / vname
    info = read_version(vdir)
    st = read_state(vdir)
    done, failed = dict(st["done"]), dict(st["failed"])
    if info.get("base"):
        bd, bf = covered_units(sdir, info["base"])
        for u, r in bd.items():
            done.setdefault(u, r)
        for u, r in bf.items():
            if u not in done:
                failed.setdefault(u, r)
    return done, failed


def finalize(sdir: str | os.PathLike, vname: str, units: Iterable[str],
             source_errors: Iterable[dict] = ()) -> dict | None:
    """If every unit is done or failed: write manifest.json and the merged errors.jsonl (atomically), move LATEST
    to this version if it is newer than LATEST's, and return the manifest; else None. Idempotent; safe to call
    from several ranks. ``source_errors``: the sources' bad inputs that are no work unit (a missing path, a
    corrupt tar member; ``ErrorLog`` records of the caller's listing), added to errors.jsonl after the failed
    units with ``unit: null, stage: "sources"``."""
    sdir = Path(sdir)
    vdir = sdir / vname
    units = sorted(set(units))
    done, failed = covered_units(sdir, vname)
    missing = [u for u in units if u not in done and u not in failed]
    if missing:
        return None
    shards = version_shards(sdir, vname)
    info = read_version(vdir)
    manifest = {
        "format": MANIFEST_FORMAT, "set": sdir.name, "version": vname, "identity": info["identity"],
        "base": info.get("base"), "complete": True,
        "units": {"total": len(units), "done": sum(u in done for u in units), "failed": sum(u in failed for u in units)},
        "samples": sum(int(e["samples"]) for e in shards),
        "shards": [{k: e[k] for k in ("shard", "samples", "sha256", "bytes")} for e in shards],
        "unit_ids": units,
    }
    errs = [failed[u] for u in units if u in failed]
    errs += [{**r, "unit": None, "stage": "sources"} for r in source_errors]
    atomic_write_text(vdir / "errors.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in errs))
    atomic_write_json(vdir / "manifest.json", manifest)
    cur = latest(sdir) if (sdir / "LATEST").exists() else None
    if cur is None or int(cur[1:]) <= int(vname[1:]):
        atomic_write_text(sdir / "LATEST", vname + "\n")
    return manifest


def read_manifest(vdir: str | os.PathLike) -> dict:
    return read_json(Path(vdir) / "manifest.json", MANIFEST_FORMAT)


def resolve_label_set(path: str | os.PathLike) -> tuple[Path, str]:
    """(set dir, version) for a path naming a label set (its LATEST version) or one version directory."""
    p = Path(path)
    if (p / "version.json").is_file():
        return p.parent, p.name
    if (p / "LATEST").is_file():
        return p, latest(p)
    versions = list_versions(p)
    if versions:
        raise InputError(p, f"no complete version yet (LATEST missing); versions: {', '.join(versions)}")
    raise InputError(p, "not a label set or label-set version")
