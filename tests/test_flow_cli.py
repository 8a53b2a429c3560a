"""``flowdistill flow`` with a teacher bundle, and the ``kltrace`` / ``rgbdiff`` flow sources."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from pipeline.cli import main
from teacher.checkpoints import save_teacher_bundle
from teacher.lpq import LPQ, PRESETS as LPQ_PRESETS
from teacher.lras import LRAS, PRESETS
from teacher.sequence import TokenLayout

torch.set_num_threads(1)

FAST = ["--set", "tracer.num_masks=1", "--set", "tracer.zoom_levels=1", "--set", "threads=1"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    d = tmp_path_factory.mktemp("teacher") / "bundle"
    torch.manual_seed(0)
    lras, lpq = LRAS(PRESETS["nano"]).eval(), LPQ(LPQ_PRESETS["tiny"]).eval()
    save_teacher_bundle(d, lras, lpq, TokenLayout.for_sizes(256, 8), (64, 64), provenance={"test": "random"})
    return d


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("frames")
    rng = np.random.default_rng(0)
    f0 = rng.integers(0, 256, (48, 72, 3), dtype=np.uint8)
    f1 = np.roll(f0, (2, 3), axis=(0, 1))
    Image.fromarray(f0).save(d / "f0.png")
    Image.fromarray(f1).save(d / "f1.png")
    Image.fromarray(f1[:40]).save(d / "small.png")
    return d


def _parse(out):
    rows = []
    for line in out.splitlines():
        if "->" in line and not line.startswith("#"):
            a, b = line.split("->")
            x0, y0 = map(float, a.split())
            x1, y1, vis, score = b.split()
            rows.append((x0, y0, float(x1), float(y1), int(vis), float(score)))
    return rows


def test_flow_prints_targets_and_writes_picture(bundle, frames, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["flow", "--teacher", str(bundle), str(frames / "f0.png"), str(frames / "f1.png"),
               "--points", "10,12", "30.5,20", "--out", str(out)] + FAST)
    assert rc == 0
    rows = _parse(capsys.readouterr().out)
    assert [(r[0], r[1]) for r in rows] == [(10.0, 12.0), (30.5, 20.0)]
    for _, _, x1, y1, vis, score in rows:
        assert np.isfinite([x1, y1, score]).all() and vis in (0, 1)
    png = out / "flow.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    w, h = Image.open(png).size
    assert w >= 3 * 72 and h > 48                                       # frame0 | frame1 | heat map (+ caption)
    res = json.loads((out / "targets.json").read_text())
    assert len(res["targets"]) == 2 and res["tracer"]["num_masks"] == 1 and res["engine_stats"]["tokens"] > 0


def test_flow_with_shipped_fast_config(bundle, frames, tmp_path, capsys):
    from pathlib import Path

    cfg = Path(__file__).resolve().parents[1] / "configs" / "teacher" / "kltrace_fast.yaml"
    rc = main(["flow", "--config", str(cfg), "--teacher", str(bundle), str(frames / "f0.png"),
               str(frames / "f1.png"), "--points", "40,30", "--out", str(tmp_path / "c")])
    assert rc == 0
    assert len(_parse(capsys.readouterr().out)) == 1
    res = json.loads((tmp_path / "c" / "targets.json").read_text())
    assert res["tracer"]["num_masks"] == 2 and res["tracer"]["zoom_levels"] == 2


def test_flow_naive_and_rgb_variants(bundle, frames, tmp_path, capsys):
    rc = main(["flow", "--teacher", str(bundle), str(frames / "f0.png"), str(frames / "f1.png"),
               "--points", "5,5", "--out", str(tmp_path / "n"), "--set", "engine.enabled=false"] + FAST)
    assert rc == 0 and len(_parse(capsys.readouterr().out)) == 1
    rc = main(["flow", "--teacher", str(bundle), str(frames / "f0.png"), str(frames / "f1.png"),
               "--points", "5,5", "--out", str(tmp_path / "r"), "--set", "tracer.method=rgb"] + FAST)
    assert rc == 0
    rows = _parse(capsys.readouterr().out)
    assert len(rows) == 1 and np.isfinite(rows[0][2:4]).all()
    assert (tmp_path / "r" / "flow.png").is_file()


@pytest.mark.parametrize("points,needle", [(["80,10"], "80,10"), (["10,-1"], "10,-1"), (["10"], "--points 10"),
                                           (["a,b"], "a,b"), (["1,2,3"], "1,2,3"), (["10,48"], "10,48")])
def test_flow_bad_points_exit_2(bundle, frames, tmp_path, capsys, points, needle):
    rc = main(["flow", "--teacher", str(bundle), str(frames / "f0.png"), str(frames / "f1.png"),
               "--points", *points, "--out", str(tmp_path / "o")] + FAST)
    assert rc == 2
    err = capsys.readouterr().err
    assert needle in err and "error" in err
    assert not (tmp_path / "o" / "flow.png").exists()


def test_flow_bad_inputs_exit_2(bundle, frames, tmp_path, capsys):
    f0, f1 = str(frames / "f0.png"), str(frames / "f1.png")
    cases = [
        (["flow", "--teacher", str(tmp_path / "nobundle"), f0, f1, "--points", "1,1"], "nobundle"),
        (["flow", f0, f1, "--points", "1,1"], "--teacher"),
        (["flow", "--teacher", str(bundle), f0, str(frames / "small.png"), "--points", "1,1"], "small.png"),
        (["flow", "--teacher", str(bundle), f0, str(tmp_path / "missing.png"), "--points", "1,1"], "missing.png"),
        (["flow", "--teacher", str(bundle), f0, "--points", "1,1"], "f0.png"),
        (["flow", "--teacher", str(bundle), f0, f1, "--points", "1,1", "--set", "tracer.sigmaa=1"], "sigmaa"),
        (["flow", "--teacher", str(bundle), f0, f1, "--points", "1,1", "--set", "tracer.refine=x"], "refine"),
    ]
    (tmp_path / "junk.png").write_bytes(b"not an image")
    cases.append((["flow", "--teacher", str(bundle), f0, str(tmp_path / "junk.png"), "--points", "1,1"], "junk.png"))
    for argv, needle in cases:
        assert main(argv + ["--out", str(tmp_path / "o")]) == 2, argv
        assert needle in capsys.readouterr().err, argv


def test_flow_video_input(bundle, tmp_path, capsys):
    from pipeline import synthetic as S

    S.write_set(tmp_path / "set", {"num_videos": 1, "num_frames": 3, "size": [64, 64], "points": {"per_video": 4},
                                   "seed": 3})
    video = sorted((tmp_path / "set").rglob("*.mp4"))[0]
    rc = main(["flow", "--teacher", str(bundle), str(video), "--frames", "0,2", "--points", "20,20",
               "--out", str(tmp_path / "v")] + FAST)
    assert rc == 0 and len(_parse(capsys.readouterr().out)) == 1
    assert main(["flow", "--teacher", str(bundle), str(video), "--frames", "0,9", "--points", "20,20"] + FAST) == 2
    assert "0,9" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- flow sources

def test_tracer_defaults_mirror_kltrace_config():
    from pipeline.teacher_sources import TRACER_DEFAULTS
    from teacher.kltrace import KLTraceConfig

    assert TRACER_DEFAULTS == dataclasses.asdict(KLTraceConfig())


def test_kltrace_and_rgbdiff_sources_track(bundle):
    import pipeline.teacher_sources  # noqa: F401  (registers the sources)
    from pipeline.common import InputError
    from pipeline.flowsources import available_flow_sources, make_flow_source

    assert {"kltrace", "rgbdiff"} <= set(available_flow_sources())
    rng = np.random.default_rng(1)
    f0 = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    f1 = np.roll(f0, 2, axis=1)
    pts = np.array([[10.5, 20.5], [40.0, 33.0], [60.0, 5.0]], np.float32)
    for name in ("kltrace", "rgbdiff"):
        src = make_flow_source(name, {"teacher": str(bundle), "tracer": {"num_masks": 1, "zoom_levels": 1}})
        tg, vis = src.track(f0, f1, pts)
        assert tg.shape == (3, 2) and tg.dtype == np.float32 and np.isfinite(tg).all()
        assert vis.shape == (3,) and vis.dtype == bool
    assert src.tracer_cfg.method == "rgb"
    with pytest.raises(InputError, match="teacher"):
        make_flow_source("kltrace", {})
    with pytest.raises(InputError, match="nope"):
        make_flow_source("kltrace", {"teacher": str(bundle), "tracer": {"nope": 1}})
    with pytest.raises(InputError, match="frame0"):
        make_flow_source("kltrace", {"teacher": str(bundle)}).track(f0[..., :2], f1, pts)


def test_eval_cli_with_kltrace_source(bundle, tmp_path, capsys):
    """Needs ``pipeline.flowsources`` to import ``pipeline.teacher_sources`` (so evaluate's defaults know the
    source options before ``--set sources.kltrace.*`` is merged)."""
    from pipeline import synthetic as S

    S.write_set(tmp_path / "set", {"num_videos": 1, "num_frames": 3, "size": [64, 64], "points": {"per_video": 6},
                                   "seed": 5})
    out = tmp_path / "res.json"
    rc = main(["eval", "--source", "kltrace", "--data", str(tmp_path / "set"), "--out", str(out), "--no-progress",
               "--set", f"sources.kltrace.teacher={bundle}", "--set", "sources.kltrace.tracer.num_masks=1",
               "--set", "sources.kltrace.tracer.zoom_levels=0", "--set", "resize=null"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads(out.read_text())
    assert "kltrace" in res["results"] and np.isfinite(res["results"]["kltrace"]["mean"]["average_jaccard"])
