"""Stage 1 through a real local Ray cluster: K folds on Ray Train, SWA, artifact, OOF, a rerun.
(A killed worker and a killed command that continues: tests/test_ray_logs.py, where the continued
command is one of two running at once.)"""

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cam2seg import folds as folds_mod
from cam2seg.train import state
from cam2seg.archive import Archive
from cam2seg.models.classifier import load_fold_models
from cam2seg.pipeline.classify import run_key, train_classifiers

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
    assert (card.channels, card.in_chans, card.names) == (1, 1, ["class 1", "class 2", "class 3", "class 4"])
    x = torch.randn(2, 1, 64, 400)  # a grey archive: one input channel
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
        assert lrs[0] == pytest.approx(trained["cfg"].lr_encoder) and all(b <= a for a, b in zip(lrs, lrs[1:]))


def test_oof_roc_auc_clearly_beats_chance(trained):
    auc = trained["card"].metrics["oof_auc_mean"]
    print(f"OOF mean ROC-AUC {auc:.4f}, per class {trained['card'].metrics['oof_auc']}, "
          f"trained in {trained['seconds']:.0f}s")
    assert auc >= 0.8


def test_rerun_reuses_the_finished_model(trained, log_lines):
    with log_lines() as messages:
        card = train_classifiers(trained["data"], trained["out"], trained["cfg"])
    assert card.version == trained["card"].version
    assert any("already holds this classifier" in m for m in messages)
