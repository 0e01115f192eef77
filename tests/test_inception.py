"""Parity of ddm.inception with pytorch-fid's FID Inception, on random weights (no download)."""
import sys
import types

import numpy as np
import pytest

import torch  # noqa: E402  (the test extra installs it)
# The venv's torchvision wheel is a CUDA build whose C++ ops do not load against the CPU torch;
# its `_meta_registrations` (fake kernels for those ops: nms, roi_align, ...) then fails at import.
# The Inception model uses none of them, so the registrations are skipped.
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
import pytorch_fid.inception as pytorch_fid_inception  # noqa: E402

from ddm import inception  # noqa: E402

torch.set_num_threads(1)  # on a shared 2-core machine torch's 2-thread convs run ~4x slower than 1


def random_fid_inception(seed: int):
    """pytorch-fid's `fid_inception_v3()` architecture with random weights instead of the download.

    torch's default init shrinks the signal ~2x per conv, so after ~50 layers the outputs would not
    depend on the input; BatchNorm running statistics are therefore calibrated on a random image
    (every layer then sees O(1) activations), the variances jittered and floored at +0.01 (a channel
    that was near-constant on that image would otherwise be amplified up to 1/sqrt(eps) ~ 30x per
    layer on other images), and the BN affine parameters randomised, so every tensor matters.
    """
    torch.manual_seed(seed)
    fid = pytorch_fid_inception
    net = fid._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = fid.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = fid.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = fid.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = fid.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = fid.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = fid.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = fid.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = fid.FIDInceptionE_1(1280)
    net.Mixed_7c = fid.FIDInceptionE_2(2048)
    batch_norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in batch_norms:
        bn.momentum = None  # cumulative average: running stats = this batch's stats
    with torch.no_grad():
        calibration = torch.nn.functional.interpolate(torch.rand(1, 3, 32, 32), size=(299, 299), mode="bilinear")
        net.train()(2 * calibration - 1)
        for bn in batch_norms:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
            bn.running_var.mul_(torch.empty_like(bn.running_var).uniform_(0.8, 1.25)).add_(0.01)
    return net.eval()


@pytest.fixture(scope="module")
def torch_net():
    return random_fid_inception(seed=0)


@pytest.fixture(scope="module")
def weight_file(torch_net, tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    torch.save(torch_net.state_dict(), path)
    return str(path)


def reference_features(net, images_uint8, monkeypatch):
    """pytorch-fid's own forward (InceptionV3 block 3) on `net`, plus `net.fc` for the logits."""
    monkeypatch.setattr(pytorch_fid_inception, "fid_inception_v3", lambda: net)
    model = pytorch_fid_inception.InceptionV3([3]).eval()
    rgb = np.repeat(images_uint8, 3, axis=-1) if images_uint8.shape[-1] == 1 else images_uint8
    x = torch.from_numpy(rgb.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    with torch.no_grad():
        pool = model(x)[0].flatten(1)
        logits = net.fc(pool)
    return pool.numpy().astype(np.float64), logits.numpy().astype(np.float64)


@pytest.mark.parametrize("legacy", [False, True])
def test_torch_free_reader_returns_the_state_dict(torch_net, tmp_path, legacy):
    state = torch_net.state_dict()
    path = tmp_path / "state.pth"
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    loaded = inception.load_torch_state_dict(str(path))
    assert list(loaded) == list(state)
    for name, tensor in state.items():
        assert loaded[name].dtype == tensor.numpy().dtype, name
        np.testing.assert_array_equal(loaded[name], tensor.numpy(), err_msg=name)


def test_reader_rebuilds_strided_views(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {"transposed": base.t(), "sliced": base[1:, 2:5], "long": torch.tensor([3, -1], dtype=torch.int64)}
    path = tmp_path / "views.pth"
    torch.save(state, path)
    loaded = inception.load_torch_state_dict(str(path))
    for name, tensor in state.items():
        np.testing.assert_array_equal(loaded[name], tensor.numpy(), err_msg=name)


@pytest.mark.parametrize("size", [8, 32, 512])
def test_resize_matches_torch_bilinear(size):
    images = np.random.default_rng(size).integers(0, 256, (2, size, size + 3, 3), dtype=np.uint8)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    expected = 2 * torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
    got = np.asarray(inception.preprocess(images))
    np.testing.assert_allclose(got, expected.numpy().transpose(0, 2, 3, 1), rtol=0, atol=1e-6)


def test_features_match_pytorch_fid(torch_net, weight_file, monkeypatch):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (1, 32, 32, 1), dtype=np.uint8)
    extract = inception.make_extractor(inception.load_params(weight_file), batch_size=2)  # pads 3 -> 2 + 2
    for images in (rgb, gray):
        got = extract(images)
        pool, logits = reference_features(torch_net, images, monkeypatch)
        assert got["pool"].dtype == got["logits"].dtype == np.float64
        assert got["pool"].shape == (len(images), 2048) and got["logits"].shape == (len(images), 1008)
        # Both sides are float32 through ~50 sequential convs (+ BN, sums of up to 2048*9 terms in
        # different orders); rounding of ~1e-7 per op grows to ~1e-5 of the activation scale.
        # A wrong layer (padding, pool type, BN mapping, transposed kernel) gives O(1) differences.
        for name, ours, ref in (("pool", got["pool"], pool), ("logits", got["logits"], logits)):
            tolerance = 1e-4 * np.abs(ref).max()
            err = np.abs(ours - ref).max()
            print(f"{images.shape}: {name} max|ref| {np.abs(ref).max():.3g}, max abs diff {err:.2e}, "
                  f"relative to max|ref| {err / np.abs(ref).max():.2e}")
            assert err <= tolerance, name
            assert np.abs(ref - ref.mean(0)).max() > 100 * tolerance or len(ref) == 1  # outputs depend on the input


def test_param_mapping_rejects_other_state_dicts(torch_net):
    state = {k: v.numpy() for k, v in torch_net.state_dict().items()}
    del state["fc.bias"]
    state["Mixed_5b.branch1x1.conv.weight"] = state["Mixed_5b.branch1x1.conv.weight"][:1]
    with pytest.raises(ValueError, match="fc/bias.*Mixed_5b/branch1x1/conv/kernel"):
        inception.params_from_state_dict(state)


def test_missing_weight_file_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        inception.load_params(str(tmp_path / "absent.pth"))
    message = str(info.value)
    assert "--config.eval.inception_path=" in message
    assert pytorch_fid_inception.FID_WEIGHTS_URL in message


def test_extractor_rejects_float_images():
    with pytest.raises(ValueError, match="uint8"):
        inception.make_extractor({}, batch_size=1)(np.zeros((1, 32, 32, 3), np.float32))
