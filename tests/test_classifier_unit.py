"""Stage 1 pieces without Ray: model, head, SWA, schedule, state files, artifact checks."""

import json

import pytest
import torch
from torch import nn

from cam2seg import artifact
from cam2seg.train import state, swa
from cam2seg.models.classifier import Classifier, create_classifier, load_fold_models
from cam2seg.config import ClassifierConfig
from cam2seg.train.classifier_task import param_groups
from cam2seg.train.loop import make_optimizer, make_scheduler


@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenetv3_small_100", "resnet10t"])
def test_timm_split_is_kept(name):
    m = Classifier(name, num_classes=4, hidden=32).eval()
    x = torch.randn(2, 3, 64, 128)
    feats = m.forward_features(x)
    assert feats.ndim == 4 and feats.shape[0] == 2
    assert torch.allclose(m(x), m.forward_head(feats), atol=1e-6)
    assert m(x).shape == (2, 4)
    kinds = [type(layer) for layer in m.head.layers]
    assert kinds == [nn.Dropout, nn.Linear, nn.ELU, nn.Dropout, nn.Linear]


def test_efficientnet_features_are_the_silu_after_conv_head():
    m = Classifier("efficientnet_b0").eval()
    seen = {}
    m.encoder.bn2.register_forward_hook(lambda mod, i, o: seen.setdefault("act", o))
    f = m.forward_features(torch.randn(1, 3, 64, 128))
    assert isinstance(m.encoder.bn2.act, nn.SiLU)
    assert torch.equal(seen["act"], f)


def test_output_stride_gives_finer_features_with_the_same_weights():
    coarse = create_classifier("mobilenetv2_050", hidden=8).eval()
    fine = create_classifier("mobilenetv2_050", hidden=8, output_stride=16).eval()
    fine.load_state_dict(coarse.state_dict())  # dilation changes no parameter
    x = torch.randn(1, 3, 64, 256)
    assert coarse.forward_features(x).shape[-2:] == (2, 8)
    assert fine.forward_features(x).shape[-2:] == (4, 16)
    with pytest.raises(ValueError, match="does not support output_stride=16"):
        create_classifier("mobilenetv3_small_100", output_stride=16)
    with pytest.raises(ValueError, match="8, 16 or 32"):
        create_classifier("resnet10t", output_stride=12)
    assert ClassifierConfig(output_stride=16).output_stride == 16
    with pytest.raises(ValueError):
        ClassifierConfig(output_stride=12)


def test_unknown_encoder_and_wrong_pretrained_file(tmp_path):
    with pytest.raises(ValueError, match="unknown timm model"):
        create_classifier("no_such_net")
    donor = Classifier("resnet10t")
    path = str(tmp_path / "enc.safetensors")
    state.save_tensors(path, donor.encoder.state_dict())
    m = create_classifier("resnet10t", pretrained=path)
    assert torch.equal(m.encoder.conv1[0].weight, donor.encoder.conv1[0].weight)
    with pytest.raises(ValueError, match="wrong architecture"):
        create_classifier("mobilenetv3_small_100", pretrained=path)


def test_topk_keeps_best_and_averages():
    keeper = swa.TopK(3)
    losses = [0.9, 0.5, 0.7, 0.6, 0.8, 0.4]
    for e, loss in enumerate(losses):
        keeper.offer(loss, e, {"w": torch.full((2,), float(e)), "n": torch.tensor(e)})
    assert keeper.epochs == [5, 1, 3]
    avg = keeper.average()
    assert torch.allclose(avg["w"], torch.full((2,), (5 + 1 + 3) / 3))
    assert avg["n"].item() == 5  # integer buffers come from the best epoch
    with pytest.raises(ValueError):
        swa.average_state_dicts([])


def test_learning_rate_halves_after_three_epochs_without_improvement():
    cfg = ClassifierConfig(plateau_epochs=3)
    m = Classifier("resnet10t", hidden=8)
    opt = make_optimizer(param_groups(m, cfg))
    sched = make_scheduler(opt, cfg)
    lrs = []
    for loss in [1.0, 0.8, 0.9, 0.85, 0.81, 0.82, 0.7]:
        sched.step(loss)
        lrs.append([g["lr"] for g in opt.param_groups])
    # epochs 3, 4, 5 do not improve on 0.8: the rates halve after the third of them
    assert lrs[3] == [1e-4, 1e-3] and lrs[4] == [5e-5, 5e-4]
    assert lrs[6] == [5e-5, 5e-4]


def test_optimizer_state_round_trip_without_pickle(tmp_path):
    m = Classifier("resnet10t", hidden=8)
    opt = make_optimizer(param_groups(m, ClassifierConfig()))
    m(torch.randn(2, 3, 32, 64)).sum().backward()
    opt.step()
    tensors, meta = state.optimizer_to_flat(opt)
    state.save_tensors(str(tmp_path / "o.safetensors"), tensors)
    (tmp_path / "o.json").write_text(json.dumps(meta))
    opt2 = make_optimizer(param_groups(m, ClassifierConfig()))
    state.optimizer_from_flat(opt2, state.load_tensors(str(tmp_path / "o.safetensors")),
                              json.loads((tmp_path / "o.json").read_text()))
    a, b = opt.state_dict(), opt2.state_dict()
    for pid in a["state"]:
        for k in a["state"][pid]:
            assert torch.equal(torch.as_tensor(a["state"][pid][k]), torch.as_tensor(b["state"][pid][k]))


def _card(**kw):
    base = dict(kind="classifier", architecture="resnet10t", num_classes=4, class_ids=[1, 2, 3, 4],
                input_size=(32, 64), mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2), head={"hidden": 8, "dropout": 0.1},
                folds=2, fold_files=[])
    base.update(kw)
    return artifact.ModelCard(**base)


def test_artifact_round_trip_and_refusals(tmp_path):
    states = [Classifier("resnet10t", hidden=8).state_dict() for _ in range(2)]
    out = str(tmp_path / "model")
    card = artifact.write_artifact(out, _card(), states, extra={"oof.parquet": b"x"})
    assert card.version and card.fold_files == ["fold-0.safetensors", "fold-1.safetensors"]
    loaded, models = load_fold_models(out)
    assert loaded.version == card.version and len(models) == 2
    assert torch.equal(models[1].state_dict()["head.layers.1.weight"], states[1]["head.layers.1.weight"])
    # same content, same version
    again = artifact.write_artifact(str(tmp_path / "again"), _card(), states, extra={"oof.parquet": b"x"})
    assert again.version == card.version

    with pytest.raises(artifact.ArtifactError, match="expected a segmenter"):
        artifact.load_artifact(out, kind="segmenter")
    raw = json.loads((tmp_path / "model" / "model.json").read_text())
    raw["postprocess"] = {"threshold": 0.01}
    (tmp_path / "model" / "model.json").write_text(json.dumps(raw))
    with pytest.raises(artifact.ArtifactError, match="modified"):
        artifact.load_card(out)
    (tmp_path / "again" / "fold-1.safetensors").write_bytes(
        (tmp_path / "model" / "fold-0.safetensors").read_bytes())
    with pytest.raises(artifact.ArtifactError, match="fold-1.safetensors does not match"):
        artifact.load_artifact(str(tmp_path / "again"))
    (tmp_path / "again" / "fold-1.safetensors").unlink()
    with pytest.raises(artifact.ArtifactError, match="missing"):
        artifact.load_artifact(str(tmp_path / "again"))
    with pytest.raises(artifact.ArtifactError, match="no model artifact"):
        artifact.load_card(str(tmp_path / "nothing"))


def test_card_for_another_architecture_is_refused(tmp_path):
    states = [Classifier("resnet10t", hidden=8).state_dict() for _ in range(2)]
    out = str(tmp_path / "m")
    artifact.write_artifact(out, _card(architecture="mobilenetv3_small_100"), states)
    with pytest.raises(artifact.ArtifactError, match="do not fit mobilenetv3_small_100"):
        load_fold_models(out)


def test_a_card_written_before_an_optional_field_existed_still_loads(tmp_path):
    """A later cam2seg adds optional card fields (with defaults): a card written without them
    keeps its version and loads; an edited card is still refused."""
    import json

    from cam2seg.artifact import ArtifactError, _body_version, load_card

    from conftest import write_random_artifact

    out = tmp_path / "m"
    write_random_artifact(str(out))
    raw = json.loads((out / "model.json").read_text())
    del raw["postprocess"]["refine"]  # as an older cam2seg wrote it: no such field yet
    raw["version"] = _body_version({k: v for k, v in raw.items() if k not in ("version", "created")})
    (out / "model.json").write_text(json.dumps(raw))
    card = load_card(str(out))
    assert card.version == raw["version"] and card.postprocess.refine is None
    raw["postprocess"]["threshold"] = 0.99
    (out / "model.json").write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match="modified after it was written"):
        load_card(str(out))


def test_fold_tasks_get_the_cluster_and_a_short_health_check_unless_the_user_set_one(monkeypatch):
    from cam2seg.train.fold_runner import fold_env_vars

    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)
    assert fold_env_vars("127.0.0.1:6379") == {"RAY_ADDRESS": "127.0.0.1:6379",
                                               "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3")
    assert fold_env_vars("127.0.0.1:6379")["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "3"
