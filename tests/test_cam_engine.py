"""The fast CAM engine equals pytorch-grad-cam (the reference) on random-init timm models."""

import copy

import pytest
import torch

from cam2seg.cam import LIBRARY_METHODS, compute_cams, find_feature_layer, library_cams
from cam2seg.models.classifier import Classifier


@pytest.fixture(scope="module", params=["efficientnet_b0", "resnet10t"])
def model(request):
    torch.manual_seed(0)
    return Classifier(request.param).eval()


@pytest.mark.parametrize("method, aug_smooth", [("gradcam", False), ("gradcam", True), ("gradcam++", False),
                                               ("gradcam++", True), ("layercam", False)])
def test_fast_engine_equals_library(model, method, aug_smooth):
    x = torch.randn(3, 3, 64, 256, generator=torch.Generator().manual_seed(1))
    fast, p_fast = compute_cams(model, x, method, aug_smooth)
    ref, p_ref = library_cams(model, x, method, aug_smooth)
    assert fast.shape == ref.shape == (3, 4, 64, 256)
    assert (fast - ref).abs().max().item() < 1e-4
    assert torch.allclose(p_fast, p_ref, atol=1e-6)
    # not a vacuous comparison: a good share of the maps are non-zero (random-init models give
    # some all-zero maps, where every weighted activation is negative before the ReLU)
    assert (fast.amax(dim=(-2, -1)) > 0.5).float().mean() >= 0.25
    if aug_smooth:  # all six variants in one encoder pass give the same maps
        together, p_together = compute_cams(model, x, method, aug_smooth, variants_per_pass=None)
        assert (together - fast).abs().max().item() < 1e-5 and torch.equal(p_together, p_fast)


@pytest.mark.parametrize("method", ["layercam", "gradcam++"])
def test_fused_stages_equal_the_library_with_several_target_layers(model, method):
    """Maps of the stride-8 and stride-16 stages fused with the final features' map, against
    pytorch-grad-cam given the same three target layers (aug smoothing wraps the fused map the
    same way as a single one, tested above)."""
    aug_smooth = False
    from cam2seg.cam.engine import stage_indices

    x = torch.randn(2, 3, 64, 256, generator=torch.Generator().manual_seed(3))
    stages = stage_indices(model, (8, 16))
    info = model.encoder.feature_info
    assert [info[i]["reduction"] for i in stages] == [8, 16]
    layers = [model.encoder.get_submodule(info[i]["module"]) for i in stages] + [find_feature_layer(model, x[:1])]
    fused, p_fused = compute_cams(model, x, method, aug_smooth, fuse_strides=(8, 16))
    ref, p_ref = library_cams(model, x, method, aug_smooth, target_layers=layers)
    assert fused.shape == ref.shape == (2, 4, 64, 256)
    assert (fused - ref).abs().max().item() < 1e-4
    assert torch.allclose(p_fused, p_ref, atol=1e-6)
    # the fusion is not the final map alone: finer stages changed it
    alone, _ = compute_cams(model, x, method, aug_smooth)
    assert (alone - fused).abs().max().item() > 0.05
    assert (fused.amax(dim=(-2, -1)) > 0.5).float().mean() >= 0.25


def test_stage_gradients_batched_equal_one_backward_per_class(model):
    from cam2seg.cam.engine import stage_gradients, stage_indices

    x = torch.randn(2, 3, 64, 128, generator=torch.Generator().manual_seed(4))
    idx = stage_indices(model, (8,))
    la, acts_a, ga = stage_gradients(model, x, idx, batched=True)
    lb, acts_b, gb = stage_gradients(model, x, idx, batched=False)
    assert torch.equal(la, lb) and len(ga) == len(gb) == 2
    for a, b, act in zip(ga, gb, acts_a):
        assert a.shape == (4, *act.shape) and torch.allclose(a, b, atol=1e-6)
        assert a.abs().sum() > 0
    with pytest.raises(ValueError, match="no encoder stage at stride 64"):
        stage_indices(model, (64,))


def test_target_layer_is_the_forward_features_output():
    m = Classifier("efficientnet_b0").eval()
    assert find_feature_layer(m, torch.randn(1, 3, 64, 128)) is m.encoder.bn2


def test_out_size_ensemble_and_errors():
    torch.manual_seed(0)
    a, b = Classifier("resnet10t").eval(), Classifier("resnet10t").eval()
    x = torch.randn(2, 3, 32, 128)
    cams, probs = compute_cams([a, b], x, out_size=(64, 400))
    assert cams.shape == (2, 4, 64, 400) and probs.shape == (2, 4)
    assert cams.min() >= 0 and cams.max() <= 1
    ca, pa = compute_cams(a, x, out_size=(64, 400))
    cb, pb = compute_cams(b, x, out_size=(64, 400))
    assert torch.allclose(cams, (ca + cb) / 2, atol=1e-6) and torch.allclose(probs, (pa + pb) / 2)
    with pytest.raises(ValueError, match="unknown fast CAM method"):
        compute_cams(a, x, method="scorecam")
    with pytest.raises(ValueError, match=r"\[B, channels, h, w\]"):
        compute_cams(a, x[0])
    with pytest.raises(ValueError, match="unknown library CAM method"):
        library_cams(a, x, method="nope")


@pytest.mark.parametrize("method", ["xgradcam", "eigencam", "layercam"])
def test_library_engine_offers_other_methods(method):
    assert method in LIBRARY_METHODS
    m = Classifier("resnet10t").eval()
    cams, probs = library_cams(m, torch.randn(2, 3, 32, 128), method, aug_smooth=False, out_size=(40, 160))
    assert cams.shape == (2, 4, 40, 160) and torch.isfinite(cams).all()


def test_guided_backprop_equals_the_librarys_on_a_relu_model():
    from pytorch_grad_cam import GuidedBackpropReLUModel

    from cam2seg.cam import guided_backprop, guided_model

    torch.manual_seed(0)
    m = Classifier("resnet10t").eval()
    x = torch.randn(2, 3, 32, 128, generator=torch.Generator().manual_seed(2))
    plain = [p.clone() for p in m.state_dict().values()]
    ours = guided_backprop(guided_model(m), x)  # [B, C, 3, H, W]
    assert ours.shape == (2, 4, 3, 32, 128)
    ref_model = copy.deepcopy(m)  # the library swaps the model's ReLUs in place
    for k in range(4):
        ref = GuidedBackpropReLUModel(ref_model, device="cpu")(x[:1], target_category=k)  # [H, W, 3]
        ref = torch.from_numpy(ref).permute(2, 0, 1)
        assert ref.abs().max() > 0
        assert (ours[0, k] - ref).abs().max() < 1e-5 * ref.abs().max()
    # guided differs from the plain input gradient, and the model itself is untouched
    xg = x.clone().requires_grad_(True)
    (plain_grad,) = torch.autograd.grad(m(xg)[:, 0].sum(), xg)
    assert not torch.allclose(plain_grad, ours[:, 0])
    assert all(torch.equal(a, b) for a, b in zip(plain, m.state_dict().values()))
    assert any(isinstance(mod, torch.nn.ReLU) for mod in m.modules())


def test_guided_gradcam_on_a_silu_model():
    torch.manual_seed(0)
    m = Classifier("efficientnet_b0").eval()
    x = torch.randn(2, 3, 64, 256, generator=torch.Generator().manual_seed(3))
    cams, probs = compute_cams(m, x, "gradcam++", aug_smooth=False)
    guided, p2 = compute_cams(m, x, "guided-gradcam++", aug_smooth=False, out_size=(64, 256))
    assert guided.shape == cams.shape and torch.equal(probs, p2)
    assert guided.min() >= 0 and guided.max() <= 1
    # zero wherever the CAM is zero; pixel-sharper than the CAM elsewhere
    assert (guided[cams == 0] == 0).all()
    live = cams.amax(dim=(-2, -1)) > 0
    tv = lambda t: (t[..., 1:] - t[..., :-1]).abs().mean(dim=(-2, -1))  # noqa: E731
    assert (tv(guided)[live] > tv(cams)[live]).all()


@pytest.mark.parametrize("gate", [torch.nn.ReLU, torch.nn.ReLU6, torch.nn.SiLU, torch.nn.Hardswish, torch.nn.GELU,
                                  torch.nn.LeakyReLU])
def test_guided_gate_is_its_own_derivative_clamped_at_zero(gate):
    """On Linear -> gate -> Linear, the guided input gradient of logit k is
    ``max(0, act'(h) * W2[k]) @ W1`` with ``act'`` from autograd on the gate alone."""
    from cam2seg.cam import guided_backprop, guided_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 16), gate(), torch.nn.Linear(16, 3)).eval()
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1)) * 3  # reaches every gate's regimes
    ours = guided_backprop(guided_model(net), x)  # [B, C, 5]
    assert ours.shape == (4, 3, 5)
    w1, w2 = net[0].weight.detach(), net[2].weight.detach()
    h = net[0](x).detach().requires_grad_(True)
    (d_act,) = torch.autograd.grad(gate()(h).sum(), h)  # elementwise act'(h), [B, 16]
    clamped_somewhere = False
    for k in range(3):
        upstream = d_act * w2[k]
        ref = upstream.clamp(min=0) @ w1
        assert torch.allclose(ours[:, k], ref, atol=1e-6, rtol=1e-5), (gate.__name__, k)
        clamped_somewhere |= bool((upstream < 0).any())
        # and unlike the plain gradient wherever a negative part was dropped
        xg = x.clone().requires_grad_(True)
        (plain,) = torch.autograd.grad(net(xg)[:, k].sum(), xg)
        assert torch.allclose(plain, upstream @ w1, atol=1e-6, rtol=1e-5)
    assert clamped_somewhere
    assert not torch.allclose(ours[:, 0], (d_act * w2[0]) @ w1)
