"""`python -m experiments.ddpm --preset tiny` end to end on 8 fake devices: train, grids, FID, bits/dim."""
import json
import os

import numpy as np
from PIL import Image

from experiments import ddpm


def test_tiny_preset_trains_samples_and_evaluates(tmp_path):
    workdir = tmp_path / "run"
    results = ddpm.main(["--preset", "tiny", "--workdir", str(workdir), "--set", "train.num_steps=10"])
    saved = json.loads((workdir / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["steps"] == 10 and saved["steps_per_sec"] > 0
    # FID against the train set; the floor (test vs train) is far below an untrained model's.
    assert np.isfinite(saved["fid"]) and saved["fid_floor"] < saved["fid"]
    # The bound: positive terms that add up.
    terms = saved["bpd_prior"] + saved["bpd_decoder"] + saved["bpd_kl"]
    assert saved["bpd_prior"] > 0 and saved["bpd_kl"] > 0 and abs(saved["bpd_total"] - terms) < 1e-3
    grids = sorted(os.listdir(workdir / "samples"))
    assert "ddim10_step0000010.png" in grids and "ancestral100_final.png" in grids
    grid = np.asarray(Image.open(workdir / "samples" / "ddim10_step0000010.png"))
    assert grid.ndim == 2 and grid.std() > 0  # 16 grey-scale samples, not a blank image
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [5, 10]
    assert (workdir / "curves.png").exists() and (workdir / "checkpoints" / "10").exists()
