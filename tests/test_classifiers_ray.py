"""Stage 1 through a real local Ray cluster: K folds on Ray Train, SWA, artifact, OOF, faults."""

import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cam2seg import folds as folds_mod
from cam2seg.train import state
from cam2seg.synthetic import synth
from cam2seg.archive import Archive
from cam2seg.models.classifier import load_fold_models
from cam2seg.pipeline.classify import run_key, train_classifiers

from conftest import registered_checkpoints, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(trained_classifier):
    return trained_classifier


def test_artifact_complete_and_loadable(trained):
    out = trained["out"]
    for name in ["model.json", "fold-0.safetensors", "fold-1.safetensors", "oof.parquet", "folds.csv"]:
        assert os.path.exists(os.path.join(out, name)), name
    card, models = load_fold_models(out)
    assert card.version == trained["card"].version and len(models) == 2
    assert card.architecture == "mobilenetv3_small_100" and tuple(card.input_size) == (64, 400)
    assert set(card.metrics["oof_auc"]) == {"1", "2", "3", "4"}
    x = torch.randn(2, 3, 64, 400)
    assert models[0](x).shape == (2, 4)


def test_oof_covers_every_image_once_with_the_saved_split(trained):
    arch = Archive.open(trained["data"])
    oof = pq.read_table(os.path.join(trained["out"], "oof.parquet")).to_pydict()
    assert sorted(oof["image_id"]) == arch.image_ids and len(set(oof["image_id"])) == len(arch)
    saved = folds_mod.load_folds(os.path.join(trained["out"], "folds.csv"))
    assert all(saved[i] == f for i, f in zip(oof["image_id"], oof["fold"]))
    probs = np.array([oof[f"prob_{c}"] for c in (1, 2, 3, 4)]).T
    assert np.isfinite(probs).all() and ((probs >= 0) & (probs <= 1)).all()


def test_swa_weights_are_the_mean_of_the_three_best_epochs(trained):
    key = run_key(trained["cfg"], Archive.open(trained["data"]))
    card, _ = load_fold_models(trained["out"])
    for k in range(2):
        done = os.path.join(trained["out"], "_train", key, "done", f"fold-{k}")
        final = state.read_json(os.path.join(done, "final.json"))
        epochs = [r for r in final["history"] if "val_loss" in r and "event" not in r]
        best3 = sorted(epochs, key=lambda r: (r["val_loss"], r["epoch"]))[:3]
        assert sorted(final["swa_epochs"]) == sorted(r["epoch"] for r in best3)
        snaps = [state.load_tensors(os.path.join(done, f"top-{i}.safetensors")) for i in range(3)]
        fold = state.load_tensors(os.path.join(trained["out"], f"fold-{k}.safetensors"))
        # Learned tensors are the mean; BatchNorm running statistics were recomputed for them.
        stats = ("running_mean", "running_var", "num_batches_tracked")
        for name, w in fold.items():
            mean = torch.stack([s[name].double() for s in snaps]).mean(0).to(w.dtype)
            if name.endswith(stats):
                continue
            assert torch.allclose(w, mean, atol=1e-6), name
        assert any(not torch.allclose(fold[n], torch.stack([s[n] for s in snaps]).mean(0))
                   for n in fold if n.endswith("running_var"))
        assert set(final["swa_bn_variants"]) == {"averaged_bn", "recomputed_bn"}
        # learning rates logged per epoch follow the plateau rule
        lrs = [r["lr_encoder"] for r in epochs]
        assert lrs[0] == pytest.approx(3e-3) and all(b <= a for a, b in zip(lrs, lrs[1:]))


def test_oof_roc_auc_clearly_beats_chance(trained):
    auc = trained["card"].metrics["oof_auc_mean"]
    print(f"OOF mean ROC-AUC {auc:.4f}, per class {trained['card'].metrics['oof_auc']}, "
          f"trained in {trained['seconds']:.0f}s")
    assert auc >= 0.8


def test_rerun_reuses_the_finished_model(trained, log_lines):
    with log_lines() as messages:
        card = train_classifiers(trained["data"], trained["out"], trained["cfg"])
    assert card.version == trained["card"].version
    assert any("already holds this model" in m for m in messages)


def _descendants(pid):
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_killed_worker_resumes_and_killed_command_continues(tmp_path):
    """Kill a training worker by pid: its fold resumes from its checkpoint. Then kill the whole
    command (its process group, by id) and re-run it: it continues instead of starting over."""
    import psutil

    data = str(tmp_path / "archive")
    synth.write_archive(data, images=60, height=32, width=128, seed=1, mix="balanced", progress=None)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("classifier:\n  encoder: mobilenetv3_small_100\n  folds: 2\n  epochs: 10\n"
                        "  size: [32, 128]\n  batch_size: 8\n  keep_checkpoints: true\n")
    out = tmp_path / "model"
    exe = os.path.join(os.path.dirname(sys.executable), "cam2seg")
    cmd = [exe, "train-classifiers", "--data", data, "--out", str(out), "--config", str(cfg_file)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log1 = open(tmp_path / "run1.log", "w")
    proc = subprocess.Popen(cmd, stdout=log1, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        runs = out / "_train"

        def registered(fold):
            return registered_checkpoints(runs, fold)

        wait_for(lambda: registered(0), 240, "a registered checkpoint of fold 0")
        ckpt_dir = next(runs.glob(f"*/runs/fold-0/{registered(0)[-1]}"))
        victim = psutil.Process(json.loads((ckpt_dir / "state.json").read_text())["pid"])
        assert "RayTrainWorker" in " ".join(victim.cmdline())
        before = set(registered(0))  # Ray Train keeps 2: a new name, not a higher count, is a new checkpoint
        victim.kill()
        wait_for(lambda: "resuming at epoch" in (tmp_path / "run1.log").read_text(), 240, "fold 0 to resume")
        wait_for(lambda: set(registered(0)) - before, 240, "fold 0 to checkpoint again")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        log1.close()
        for p in psutil.process_iter(["cmdline"]):  # Ray processes of that session, by id
            try:
                if p.info["cmdline"] and str(out) in " ".join(p.info["cmdline"]):
                    p.kill()
            except psutil.Error:
                pass
    assert not (out / "model.json").exists()

    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=420, start_new_session=True)
    text = r.stdout + r.stderr
    assert r.returncode == 0, text[-3000:]
    # Fold 0 had checkpointed past its first epoch: the second run continues it (or reuses it
    # if it had finished), and never trains its first epoch again.
    resumed = re.search(r"\[fold 0\] resuming at epoch (\d+)/10", text)
    assert (resumed and int(resumed.group(1)) > 1) or "fold 0: finished in an earlier run" in text, text[-3000:]
    assert "[fold 0] epoch 1/10 " not in text, text[-3000:]
    assert (out / "model.json").exists()
    card, models = load_fold_models(str(out))
    assert len(models) == 2
    # Its history has the resume inside the first run (the worker kill) and, when the second run
    # continued it, a second one at a later epoch.
    final = next(out.glob("_train/*/done/fold-0/final.json"))
    events = [r["epoch"] for r in json.loads(final.read_text())["history"] if r.get("event") == "resumed"]
    assert events and events[0] > 0, f"fold 0 never resumed from a checkpoint: {events}"
    if resumed:
        assert len(events) >= 2 and events[-1] == int(resumed.group(1)) - 1, events
