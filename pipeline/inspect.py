"""``flowdistill inspect PATH``: statistics and pictures of label shards or a synthetic set.

PATH is a shard, a directory of shards, a label set (``<root>/<set>``: its ``LATEST`` version, or its newest
version when none is complete yet), one label-set version dir (``<root>/<set>/vNNNN`` with ``version.json``),
a brace pattern, or a synthetic set (a dir whose ``index.json`` says ``"kind": "synthetic"``). Every
sample is read and validated; the command prints shard/sample/point counts, the visible fraction, score
quantiles and histogram, motion-magnitude quantiles and image sizes, checks shards against their
``*.index.json`` when present, and writes ``stats.json`` plus N pictures (tracks frame 0 → frame 1 and
colour-coded sparse flow) chosen reproducibly with ``--seed``.

For a label-set version (``pipeline.manifest`` layout) it also reports the version, its identity (teacher id,
tracer / sampling hashes), whether it is complete (``manifest.json``) and LATEST, the work units done and failed
(ledgers reconciled with the shard indexes, plus errors, as ``manifest.covered_units`` does; a ``--keep-old``
version counts its base's), the first failure reasons, each rank's last run summary, and shard files no index
names (left by a killed writer; removed when that rank resumes). The samples read are those of the indexed
shards (the base version's included), i.e. what a trainer reading the version gets.
"""
from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

DEFAULTS = {
    "num": 8,            # pictures to write
    "seed": 0,           # which samples are pictured / subsampled
    "max_points": 300,   # at most this many tracks drawn per picture
    "reservoir": 200000, # quantiles/histograms use at most this many values (exact below it)
    "hist_bins": 10,
}
QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


def add_arguments(parser) -> None:
    parser.add_argument("path", help="shard, dir of shards, label-set (version) dir, brace pattern, or synthetic set")
    parser.add_argument("--out", default=None, help="output folder (default: runs/inspect/<name>)")
    parser.add_argument("--num", type=int, default=None, help="number of pictures (default 8)")
    parser.add_argument("--seed", type=int, default=None, help="seed choosing the pictured samples (default 0)")


def run(args, cfg) -> int:
    from .common import InputError

    num = cfg["num"] if args.num is None else args.num
    seed = cfg["seed"] if args.seed is None else args.seed
    if num < 0:
        raise InputError(f"--num {num}", "must be >= 0")
    out = Path(args.out) if args.out else Path("runs") / "inspect" / _name_of(args.path)
    inspect_path(args.path, out, num=num, seed=seed, max_points=cfg["max_points"],
                 reservoir=cfg["reservoir"], hist_bins=cfg["hist_bins"], verbose=True)
    return 0


def _name_of(path) -> str:
    p = Path(str(path).split("::")[0])
    name = p.name or "shards"
    if (p / "version.json").is_file():          # a label-set version: <set>_<version>
        name = f"{p.resolve().parent.name}_{name}"
    for ch in "{}*?":
        name = name.replace(ch, "_")
    return name[:-4] if name.endswith(".tar") else name


# ------------------------------------------------------------------------------------------ helpers

class _Reservoir:
    """Uniform random subset of at most ``k`` values of a stream (keep the k smallest random priorities)."""

    def __init__(self, k: int, rng):
        import numpy as np

        self.k, self.rng = int(k), rng
        self.vals = np.zeros(0, np.float64)
        self.keys = np.zeros(0, np.float64)
        self.n = 0

    def add(self, values) -> None:
        import numpy as np

        values = np.asarray(values, np.float64).reshape(-1)
        if values.size == 0:
            return
        self.n += values.size
        self.vals = np.concatenate([self.vals, values])
        self.keys = np.concatenate([self.keys, self.rng.random(values.size)])
        if self.vals.size > self.k:
            keep = np.argpartition(self.keys, self.k - 1)[: self.k]
            self.vals, self.keys = self.vals[keep], self.keys[keep]

    def summary(self, bins: int | None = None) -> dict | None:
        import numpy as np

        if self.vals.size == 0:
            return None
        out = {"n": int(self.n), "sampled": int(self.vals.size), "exact": bool(self.n == self.vals.size),
               "quantiles": {f"{q:g}": float(np.quantile(self.vals, q)) for q in QUANTILES},
               "mean": float(self.vals.mean())}
        if bins:
            counts, edges = np.histogram(self.vals, bins=bins)
            out["histogram"] = {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}
        return out


def _pick(n_items_seen: int, chosen: list, item, k: int, rnd: random.Random) -> None:
    """Reservoir sampling (algorithm R) of k items; ``n_items_seen`` counts items before this one."""
    if len(chosen) < k:
        chosen.append((n_items_seen, item))
    else:
        j = rnd.randrange(n_items_seen + 1)
        if j < k:
            chosen[j] = (n_items_seen, item)


def render_pair(frame0, frame1, p0, p1, visible, title: str, max_points: int, seed: int):
    """Picture of one frame pair: [frame0 | frame1 with tracks] over [overlay arrows | sparse flow]."""
    import numpy as np

    from .viz import caption, draw_tracks, sparse_flow_image

    p0, p1, visible = np.asarray(p0), np.asarray(p1), np.asarray(visible, bool)
    if len(p0) > max_points:
        sel = np.sort(np.random.default_rng(seed).choice(len(p0), max_points, replace=False))
        p0, p1, visible = p0[sel], p1[sel], visible[sel]
    h = frame0.shape[0]
    scale = int(min(8, max(1, math.ceil(256 / max(h, 1)))))
    tracks = (p0, p1, visible)
    top = draw_tracks(frame0, frame1, tracks, mode="side", scale=scale)
    bottom = np.concatenate([draw_tracks(frame0, frame1, tracks, mode="overlay", scale=scale),
                             sparse_flow_image(frame0.shape, p0, p1, visible, scale=scale)], axis=1)
    return caption(np.concatenate([top, bottom], axis=0), title)


# ------------------------------------------------------------------------------------------- shards

def _resolve(path) -> tuple[str, object]:
    """→ ("synthetic", dir), ("label_set", (set dir, version, note)) or ("shards", list of shard paths)."""
    from .common import InputError
    from .shards import list_shards

    p = Path(str(path))
    found = _label_set_version(p)
    if found is not None:
        return "label_set", found
    if p.is_dir():
        idx = p / "index.json"
        if idx.is_file():
            try:
                kind = json.loads(idx.read_text(encoding="utf-8")).get("kind")
            except (OSError, ValueError, AttributeError) as e:
                raise InputError(idx, f"unreadable index.json: {e}") from None
            if kind == "synthetic":
                return "synthetic", p
        latest = p / "LATEST"
        if latest.is_file() and not any(q.suffix == ".tar" for q in p.iterdir()):
            version = latest.read_text(encoding="utf-8").strip()
            if not version or not (p / version).is_dir():
                raise InputError(latest, f"names version {version!r}, which is not a directory here")
            p = p / version
            return "shards", list_shards(p)
    return "shards", list_shards(str(path))


def _index_entries(shards: list[str]) -> dict[str, dict]:
    """Index entries (from ``*.index.json`` next to the shards) keyed by shard path."""
    from .shards import read_index

    found: dict[str, dict] = {}
    for d in sorted({Path(s).parent for s in shards}):
        for idx in sorted(d.glob("*.index.json")):
            for e in read_index(idx):
                found[str(d / e["shard"])] = e
    return found


def _shard_stats(shards: list[str], num: int, seed: int, cfg: dict) -> tuple[dict, list]:
    import numpy as np

    from .common import InputError
    from .schema import VISIBLE_THRESHOLD
    from .shards import iter_samples, verify_shard

    rng = np.random.default_rng(seed)
    scores, motion = _Reservoir(cfg["reservoir"], rng), _Reservoir(cfg["reservoir"], rng)
    rnd = random.Random(seed)
    chosen: list = []
    sizes, label_sets, versions, teachers = Counter(), Counter(), Counter(), Counter()
    videos: set[str] = set()
    n_samples = n_points = n_visible = 0
    per_sample: list[int] = []
    index = _index_entries(shards)
    verified = 0
    for shard in shards:
        entry = index.get(str(Path(shard)))
        if entry is not None:
            verify_shard(shard, entry)
        n_in_shard = 0
        for s in iter_samples(shard):
            t = s.tracks
            vis = t[:, 4] > VISIBLE_THRESHOLD
            n = len(t)
            per_sample.append(n)
            n_points += n
            n_visible += int(vis.sum())
            scores.add(t[:, 5])
            motion.add(np.hypot(t[vis, 2] - t[vis, 0], t[vis, 3] - t[vis, 1]))
            h, w = s.frame0.shape[:2]
            sizes[f"{w}x{h}"] += 1
            videos.add(s.meta["video_id"])
            label_sets[s.meta["label_set"]] += 1
            versions[str(s.meta["version"])] += 1
            teachers[s.meta["teacher"]["id"]] += 1
            _pick(n_samples, chosen, s, num, rnd)
            n_samples += 1
            n_in_shard += 1
        if entry is not None:
            if entry["samples"] != n_in_shard:
                raise InputError(shard, f"holds {n_in_shard} samples, index says {entry['samples']}")
            verified += 1
    stats = {
        "kind": "shards",
        "shards": len(shards),
        "samples": n_samples,
        "videos": len(videos),
        "points": n_points,
        "points_per_sample": ({"min": int(min(per_sample)), "mean": float(np.mean(per_sample)),
                               "max": int(max(per_sample))} if per_sample else None),
        "visible_fraction": (n_visible / n_points) if n_points else None,
        "score": scores.summary(cfg["hist_bins"]),
        "motion_px": motion.summary(cfg["hist_bins"]),
        "image_sizes": dict(sorted(sizes.items())),
        "label_sets": dict(sorted(label_sets.items())),
        "versions": dict(sorted(versions.items())),
        "teachers": dict(sorted(teachers.items())),
        "index": {"shards_in_index": sum(1 for s in shards if str(Path(s)) in index), "verified": verified,
                  "missing": sorted(Path(p).name for p in index if not Path(p).is_file())},
    }
    pictures = []
    for order, s in sorted(chosen, key=lambda c: c[0]):
        t = s.tracks
        pictures.append((s.key, s.frame0, s.frame1, t[:, 0:2], t[:, 2:4], t[:, 4] > VISIBLE_THRESHOLD))
    return stats, pictures


# ---------------------------------------------------------------------------------------- label sets

def _label_set_version(p: Path):
    """(set dir, version name, note) when ``p`` is a label-set version dir (``version.json``) or a label set
    whose LATEST (or, lacking LATEST, newest) version has one; else None (plain shard directories)."""
    from . import manifest as mf

    if not p.is_dir():
        return None
    if (p / "version.json").is_file():
        return p.parent, p.name, None
    latest = p / "LATEST"
    if latest.is_file():
        name = latest.read_text(encoding="utf-8").strip()
        if (p / name / "version.json").is_file():
            return p, name, None
        return None                     # LATEST over bare shard dirs: inspected as plain shards
    versions = mf.list_versions(p)
    if versions:
        return p, versions[-1], f"no LATEST (no version complete yet): inspecting the newest version {versions[-1]}"
    return None


def _label_set_info(sdir: Path, vname: str, note: str | None) -> tuple[dict, list[str]]:
    """Version-level facts (identity, completeness, units, failures, rank summaries, stray files) and the paths
    of the version's indexed shards that exist (its base's included)."""
    from . import manifest as mf
    from .common import InputError

    vdir = sdir / vname
    vinfo = mf.read_version(vdir)
    try:
        latest = mf.latest(sdir)
    except InputError:
        latest = None
    manifest = mf.read_manifest(vdir) if (vdir / "manifest.json").is_file() else None
    done, failed = mf.covered_units(sdir, vname)
    own = mf.read_state(vdir)
    shards = mf.version_shards(sdir, vname)
    paths = [vdir / e["shard"] for e in shards]
    indexed = {e["shard"] for e in shards}
    stray = sorted(q.name for q in vdir.iterdir()
                   if (q.name.endswith(".tar") and q.name not in indexed) or q.name.endswith(".tar.partial"))
    ranks = {}
    for q in sorted(vdir.glob("summary-*.json")):
        try:
            s = json.loads(q.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        ranks[q.stem.split("-", 1)[1]] = {k: s.get(k) for k in (
            "world", "launcher", "units_assigned", "units_done", "units_failed", "source_errors", "pairs", "queries",
            "seconds_labeling", "pairs_per_s", "queries_per_s", "model_fraction", "stopped")}
    ledger_samples = sum(int(r.get("samples", 0)) for r in done.values() if "samples" in r)
    source_errors = []                 # bad inputs that are no work unit (each run re-records them: deduplicated)
    for q in sorted(vdir.glob("errors-*.jsonl")):
        for r in mf._read_jsonl(q):
            rec = {"input": r.get("input"), "reason": r.get("reason")}
            if r.get("unit") is None and rec not in source_errors:
                source_errors.append(rec)
    info = {
        "set": sdir.name, "set_dir": str(sdir), "version": vname, "note": note,
        "latest": latest, "is_latest": latest == vname,
        "identity": vinfo.get("identity"), "created": vinfo.get("created"), "base": vinfo.get("base"),
        "teacher": vinfo.get("teacher"), "teacher_dir": vinfo.get("teacher_dir"),
        "complete": manifest is not None,
        # complete: the manifest's counts (over the units of the sources it was finished with); else what the
        # ledgers, shard indexes and error files record so far
        "units": {
            "total": manifest["units"]["total"] if manifest else None,
            "done": manifest["units"]["done"] if manifest else len(done),
            "failed": manifest["units"]["failed"] if manifest else len(failed),
            "recorded_done": len(done), "recorded_failed": len(failed),
            "done_here": len(own["done"]),
            "recovered_from_shards": sum(1 for r in own["done"].values() if "recovered_from" in r),
        },
        "source_errors": source_errors[:20],
        "failures": [{"unit": u, "input": r.get("input"), "reason": r.get("reason"), "stage": r.get("stage")}
                     for u, r in sorted(failed.items())][:20],
        "samples_in_index": sum(int(e["samples"]) for e in shards),
        "samples_in_ledger": ledger_samples,
        "manifest_samples": manifest["samples"] if manifest else None,
        "ranks": ranks,
        "stray_files": stray,
        "missing_shards": [e["shard"] for e, q in zip(shards, paths) if not q.is_file()],
    }
    return info, [str(q) for q in paths if q.is_file()]


# ---------------------------------------------------------------------------------------- synthetic

def _synthetic_stats(path: Path, num: int, seed: int, cfg: dict) -> tuple[dict, list]:
    import numpy as np

    from .common import InputError

    try:
        from .synthetic import load_set
    except ImportError as e:
        raise InputError(path, f"synthetic sets need pipeline.synthetic.load_set ({e})") from None
    items = load_set(path)
    rng = np.random.default_rng(seed)
    motion = _Reservoir(cfg["reservoir"], rng)
    sizes: Counter = Counter()
    n_frames = n_points = n_visible = 0
    pairs = []
    for it in items:
        video, pts, occ = np.asarray(it["video"]), np.asarray(it["points"]), np.asarray(it["occluded"], bool)
        name = str(it.get("name", f"video{len(pairs)}"))
        if video.ndim != 4 or video.shape[-1] != 3 or video.shape[0] < 2:
            raise InputError(f"{path}:{name}", f"video shape {video.shape}, expected [T>=2, H, W, 3]")
        t, h, w = video.shape[:3]
        if pts.ndim != 3 or pts.shape[1:] != (t, 2) or occ.shape != pts.shape[:2]:
            raise InputError(f"{path}:{name}", f"points {pts.shape} / occluded {occ.shape} do not match [N, {t}, 2]")
        px = pts.astype(np.float64) * np.array([w, h], np.float64)   # normalised → raster pixels
        q = ~occ[:, 0]                                                # queries must be visible in frame 0
        p0, p1, vis = px[q, 0], px[q, 1], ~occ[q, 1]
        n_frames += t
        n_points += int(q.sum())
        n_visible += int(vis.sum())
        motion.add(np.hypot(*(p1[vis] - p0[vis]).T) if vis.any() else [])
        sizes[f"{w}x{h}"] += 1
        pairs.append((name, video[0], video[1], p0, p1, vis))
    stats = {
        "kind": "synthetic",
        "videos": len(items),
        "frames": n_frames,
        "points": n_points,
        "visible_fraction": (n_visible / n_points) if n_points else None,
        "motion_px": motion.summary(cfg["hist_bins"]),
        "image_sizes": dict(sorted(sizes.items())),
        "pair": "frame 0 -> frame 1, queries visible in frame 0",
    }
    picked = sorted(random.Random(seed).sample(range(len(pairs)), min(num, len(pairs))))
    return stats, [pairs[i] for i in picked]


# ------------------------------------------------------------------------------------------- output

def format_stats(stats: dict) -> str:
    """Human-readable summary of ``stats`` (what the command prints)."""
    lines = [f"{stats['path']}  ({stats['kind'].replace('_', ' ')})"]
    ls = stats.get("label_set")
    if ls:
        if ls.get("note"):
            lines.append(f"  NOTE: {ls['note']}")
        ident = ls["identity"] or {}
        lines.append(f"  label set {ls['set']}  version {ls['version']}  "
                     f"{'complete' if ls['complete'] else 'INCOMPLETE (no manifest.json)'}  "
                     f"LATEST {ls['latest'] or '-'}{' (this version)' if ls['is_latest'] else ''}"
                     + (f"  base {ls['base']}" if ls["base"] else ""))
        lines.append(f"  identity: teacher {ident.get('teacher_id')}  tracer {ident.get('tracer_hash')}  "
                     f"sampling {ident.get('sampling_hash')}   created {ls['created']}")
        u = ls["units"]
        total = f" of {u['total']}" if u["total"] is not None else " (total known once complete)"
        lines.append(f"  units: {u['done']} done, {u['failed']} failed{total}"
                     + (f"; {u['recovered_from_shards']} recovered from shard indexes (no ledger line)"
                        if u["recovered_from_shards"] else ""))
        for f in ls["failures"][:5]:
            lines.append(f"    failed {f['unit']}: {f['input']}: {f['reason']}")
        if u["recorded_failed"] > 5:
            lines.append(f"    … {u['recorded_failed'] - 5} more (errors-*.jsonl)")
        for f in ls["source_errors"][:5]:
            lines.append(f"    source error (no work unit): {f['input']}: {f['reason']}")
        if ls["complete"] and ls["manifest_samples"] != stats["samples"]:
            lines.append(f"  WARNING: manifest.json says {ls['manifest_samples']} samples, the shards hold "
                         f"{stats['samples']}")
        for r, s in ls["ranks"].items():
            frac = s.get("model_fraction")
            lines.append(f"  rank {r}/{s.get('world')} last run: {s.get('units_done')} units done, "
                         f"{s.get('units_failed')} failed"
                         + (f" (+{s['source_errors']} bad inputs)" if s.get("source_errors") else "")
                         + f", {s.get('pairs')} pairs, {s.get('pairs_per_s')} pairs/s"
                         + (f", {100 * frac:.0f}% in the model" if frac is not None else "")
                         + (f", stopped by {s['stopped']}" if s.get("stopped") else ""))
        if ls["stray_files"]:
            lines.append(f"  {len(ls['stray_files'])} shard file(s) no index names (a killed writer; removed on "
                         f"resume): " + ", ".join(ls["stray_files"][:5]))
    if stats["kind"] in ("shards", "label_set"):
        pps = stats["points_per_sample"]
        lines.append(f"  shards {stats['shards']}   samples {stats['samples']}   videos {stats['videos']}   "
                     f"points {stats['points']}" + (f" ({pps['min']}..{pps['max']}, mean {pps['mean']:.1f} per sample)"
                                                     if pps else ""))
        idx = stats["index"]
        lines.append(f"  index: {idx['verified']} of {stats['shards']} shards verified (sha256, bytes, samples)")
        if idx["missing"]:
            lines.append(f"  WARNING: {len(idx['missing'])} shard(s) named in an index are missing: "
                         + ", ".join(idx["missing"][:5]) + (" …" if len(idx["missing"]) > 5 else ""))
        lines.append(f"  label sets {stats['label_sets']}   versions {stats['versions']}   teachers {stats['teachers']}")
    else:
        lines.append(f"  videos {stats['videos']}   frames {stats['frames']}   points {stats['points']}")
    vf = stats["visible_fraction"]
    lines.append(f"  visible fraction {vf:.3f}" if vf is not None else "  visible fraction n/a (no points)")
    lines.append(f"  image sizes {stats['image_sizes']}")
    for name, label in (("score", "score"), ("motion_px", "motion |p1-p0| px (visible)")):
        s = stats.get(name)
        if name not in stats:
            continue
        if s is None:
            lines.append(f"  {label}: n/a")
            continue
        qs = "  ".join(f"q{float(k) * 100:g}={v:.3g}" for k, v in s["quantiles"].items())
        lines.append(f"  {label}: {qs}" + ("" if s["exact"] else f"  (from a uniform sample of {s['sampled']} of {s['n']})"))
        hist = s.get("histogram") if name == "score" else None
        if hist:
            top = max(hist["counts"]) or 1
            for lo, hi, c in zip(hist["edges"][:-1], hist["edges"][1:], hist["counts"]):
                lines.append(f"    [{lo:9.3g}, {hi:9.3g})  {c:8d}  " + "#" * round(30 * c / top))
    if stats.get("pictures"):
        lines.append(f"  pictures: {len(stats['pictures'])} in {stats['out']}")
    lines.append(f"  stats: {stats['out']}/stats.json")
    return "\n".join(lines)


def inspect_path(path, out, num: int = 8, seed: int = 0, max_points: int | None = None, *,
                 reservoir: int | None = None, hist_bins: int | None = None, verbose: bool = True) -> dict:
    """Read PATH (shards, a label set / version or a synthetic set), write ``stats.json`` and ``num`` PNGs under
    ``out``.

    Returns the statistics dict (with ``pictures``: the PNG paths written).
    """
    from .common import atomic_write_json
    from .viz import save_png

    cfg = dict(DEFAULTS)
    for k, v in (("max_points", max_points), ("reservoir", reservoir), ("hist_bins", hist_bins)):
        if v is not None:
            cfg[k] = v
    kind, target = _resolve(path)
    if kind == "synthetic":
        stats, pictures = _synthetic_stats(target, num, seed, cfg)
    elif kind == "label_set":
        info, shards = _label_set_info(*target)
        stats, pictures = _shard_stats(shards, num, seed, cfg)
        stats = {**stats, "kind": "label_set", "label_set": info}
        missing = set(stats["index"]["missing"]) | {Path(m).name for m in info["missing_shards"]}
        stats["index"]["missing"] = sorted(missing)
    else:
        stats, pictures = _shard_stats(target, num, seed, cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, (name, f0, f1, p0, p1, vis) in enumerate(pictures):
        n_vis = int(vis.sum())
        title = f"{name}  {len(p0)} pts, {n_vis} visible"
        img = render_pair(f0, f1, p0, p1, vis, title, cfg["max_points"], seed + i)
        dst = out / f"{i:03d}_{name}.png"
        save_png(dst, img)
        written.append(str(dst))
    stats = {"path": str(path), **stats, "out": str(out), "pictures": written}
    atomic_write_json(out / "stats.json", stats)
    if verbose:
        print(format_stats(stats))
    return stats
