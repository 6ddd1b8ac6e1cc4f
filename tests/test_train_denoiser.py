"""The trainer as a user runs it across machines: train a few steps, resume without naming the data again,
export the run's weights from its checkpoint alone, and start a new run from them (``--init-from``)."""
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

pytest.importorskip("torch")

TINY = {"classes": ["round", "oval"], "cache_size": 24, "batch_size": 4, "disc_batch": 2, "warmup_steps": 1,
        "unet": {"image_size": 16, "in_channels": 3, "patch_size": 2, "base_channels": 8, "channel_mult": [1, 2],
                 "blocks_per_level": 1, "attention_levels": [], "embed_dim": 16, "groups": 4, "extra": {}}}


def _train(cwd, *args):
    return subprocess.run([sys.executable, "-m", "cytoedge.training.train_denoiser", "--threads", "1", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture()
def crops(tmp_path):
    rng = np.random.default_rng(0)
    for name, axes in (("round", (14, 14)), ("oval", (18, 10))):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(4):
            img = np.full((48, 48, 3), 225, np.uint8)
            cv2.ellipse(img, (24, 24), axes, int(rng.integers(0, 180)), 0, 360, (150, 60, 140), -1)
            cv2.imwrite(str(tmp_path / "data" / name / f"{i}.png"), img)
    (tmp_path / "tiny.json").write_text(json.dumps(TINY))
    return tmp_path


def test_a_run_is_exported_from_its_own_data_and_continued_elsewhere(crops):
    data, run, cache = crops / "data", crops / "run", crops / "cache"
    # A second --config overrides the first one's keys (an ablation is one key on top of a recipe).
    (crops / "smaller-batch.json").write_text(json.dumps({"batch_size": 3}))
    first = _train(crops, "--data", str(data), "--run", str(run), "--cache", str(cache), "--config",
                   str(crops / "tiny.json"), "--config", str(crops / "smaller-batch.json"),
                   "--max-steps", "2", "--ckpt-every", "1")
    assert first.returncode == 0, first.stderr
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["batch_size"] == 3 and cfg["cache_size"] == 24 and cfg["classes"] == ["round", "oval"]
    # No --data: resuming reads the run's own data (the PBC default does not exist in this folder).
    resumed = _train(crops, "--run", str(run), "--cache", str(cache), "--max-steps", "3", "--ckpt-every", "1")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and "at step 2" in resumed.stderr
    # Exporting needs the checkpoint only: the data may be gone.
    (crops / "data").rename(crops / "moved")
    exported = _train(crops, "--run", str(run), "--export-weights", str(crops / "w.npz"))
    assert exported.returncode == 0, exported.stderr
    with np.load(crops / "w.npz") as z:
        meta = json.loads(bytes(z["__meta__"]).decode())
    assert meta["step"] == 3 and meta["cfg"]["classes"] == ["round", "oval"]
    data = crops / "moved"
    again = _train(crops, "--data", str(data), "--run", str(crops / "run2"), "--cache", str(cache), "--config",
                   str(crops / "tiny.json"), "--init-from", str(crops / "w.npz"), "--max-steps", "1")
    assert again.returncode == 0, again.stderr
    cfg = json.loads((crops / "run2" / "config.json").read_text())
    assert cfg["init_from"] == {"weights": str(crops / "w.npz"), "steps": 3, "train_minutes": meta["train_minutes"],
                                "from_run": None}


def test_a_wider_network_starts_from_the_tensors_that_match(crops):
    """--init-matching: the tensors a narrower run shares by name and shape are copied, the rest start fresh;
    without it the mismatch is refused, naming the file."""
    data, cache = crops / "data", crops / "cache"
    assert _train(crops, "--data", str(data), "--run", str(crops / "narrow"), "--cache", str(cache), "--config",
                  str(crops / "tiny.json"), "--max-steps", "1").returncode == 0
    assert _train(crops, "--run", str(crops / "narrow"), "--export-weights", str(crops / "w.npz")).returncode == 0
    (crops / "wide.json").write_text(json.dumps({**TINY, "lr": 0.0, "unet": {**TINY["unet"], "channel_mult": [1, 3]}}))
    start = ["--data", str(data), "--cache", str(cache), "--config", str(crops / "wide.json"), "--init-from",
             str(crops / "w.npz"), "--max-steps", "1"]
    refused = _train(crops, "--run", str(crops / "strict"), *start)
    assert refused.returncode != 0 and "w.npz" in refused.stderr and "--init-matching" in refused.stderr
    assert "Traceback" not in refused.stderr
    wide = _train(crops, "--run", str(crops / "wide"), *start, "--init-matching")
    assert wide.returncode == 0, wide.stderr
    loaded = json.loads((crops / "wide" / "config.json").read_text())["init_from"]["loaded"]
    k, n = (int(w) for w in loaded.split()[::2][:2])
    assert 0 < k < n
    assert _train(crops, "--run", str(crops / "wide"), "--export-weights", str(crops / "w2.npz")).returncode == 0
    with np.load(crops / "w.npz") as a, np.load(crops / "w2.npz") as b:
        same = [key for key in a.files if key != "__meta__" and key in b.files and a[key].shape == b[key].shape]
        assert len(same) == k and all(np.array_equal(a[key], b[key]) for key in same)  # lr 0: still the copies
        assert any(a[key].shape != b[key].shape for key in a.files if key in b.files)


def test_exporting_from_a_folder_that_is_no_run_names_it_and_leaves_nothing(tmp_path):
    out = _train(tmp_path, "--run", str(tmp_path / "nope"), "--export-weights", str(tmp_path / "w.npz"))
    assert out.returncode != 0 and "nope: not a training run" in out.stderr
    assert not (tmp_path / "nope").exists() and not (tmp_path / "w.npz").exists()
