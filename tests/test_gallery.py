"""flowdistill eval --gallery: predicted-frame and KL-map pictures of a teacher (pipeline/gallery.py)."""
import subprocess

import cv2
import numpy as np

from labelkit import FLOWDISTILL, REPO, make_teacher


def test_eval_gallery_writes_prediction_and_kl_pictures(tmp_path):
    teacher = make_teacher(tmp_path / "teacher")
    data = tmp_path / "held"
    subprocess.run([FLOWDISTILL, "synth", "--set", "num_videos=2", "--set", "num_frames=2", "--set", "size=[64,64]",
                    "--set", "points.per_video=8", "--set", "seed=7", "--out", str(data)],
                   check=True, capture_output=True, cwd=REPO)
    gal = tmp_path / "gal"
    r = subprocess.run([FLOWDISTILL, "eval", "--source", "kltrace", "--data", str(data), "--no-progress",
                        "--set", f"sources.kltrace.teacher={teacher}", "--set", "sources.kltrace.threads=1",
                        "--set", "gallery.num_points=2", "--gallery", str(gal)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "gallery kltrace: 4 pictures" in r.stdout
    names = sorted(p.name for p in (gal / "kltrace").iterdir())
    assert names == ["kl_synth_0000.png", "kl_synth_0001.png", "pred_synth_0000.png", "pred_synth_0001.png"]
    pred = cv2.imread(str(gal / "kltrace" / "pred_synth_0000.png"))
    # four 32-px panels upscaled 3x, each under an 18-px caption
    assert pred.shape == (18 + 96, 4 * 96, 3)
    kl = cv2.imread(str(gal / "kltrace" / "kl_synth_0000.png"))
    assert kl is not None and kl.shape[0] >= 2 * 256 and kl.shape[1] == 2 * 256
    assert np.ptp(kl) > 0
