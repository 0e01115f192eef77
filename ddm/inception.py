"""The FID Inception-v3 of pytorch-fid, as a `flax.linen` module, with a torch-free weight loader.

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium", the TTUR code) and the Inception Score (Salimans et al. 2016, "Improved Techniques
for Training GANs") are defined on TensorFlow's 2015-12-05 Inception graph. pytorch-fid
(`pytorch_fid.inception.InceptionV3` built by `fid_inception_v3()`) ports that graph and its
weights to PyTorch; this module ports pytorch-fid to JAX, layer for layer:

  * torchvision's Inception-v3 with `num_classes=1008` (TF's 1008-way softmax), no aux head;
  * Mixed_5b..5d, 6b..6e, 7b: average pooling that ignores the zero padding
    (`count_include_pad=False`, as TF); Mixed_7c: max pooling instead (a quirk of TF's graph);
  * every conv is bias-free and followed by BatchNorm (eps = 0.001) in inference mode and ReLU;
  * input: bilinear resize to 299x299 with `F.interpolate(mode='bilinear', align_corners=False)`
    semantics (no antialiasing, also when shrinking), then [0, 1] -> [-1, 1].

Module and variable names follow torchvision's (`Mixed_6b/branch7x7_2/conv`), so the state dict
maps one to one: conv `weight` (O, I, kH, kW) -> `kernel` (kH, kW, I, O); BatchNorm `weight`,
`bias` -> `params` `scale`, `bias`; `running_mean`, `running_var` -> the `batch_stats` collection
`mean`, `var` (kept unfolded so every tensor of the file can be checked against its source);
fc `weight` (1008, 2048) -> `kernel` (2048, 1008).

    variables = load_params(config.eval.inception_path)
    extract = make_extractor(variables)
    feats = extract(images_uint8)  # {"pool": (N, 2048) float64, "logits": (N, 1008) float64}

Convolutions and matmuls run at `Precision.HIGHEST` (true float32 on GPUs/TPUs, as the float32
reference) so the features do not depend on the accelerator's default TF32/bfloat16 passes.
"""
import collections
import dataclasses
import os
import pickle
import zipfile
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")  # pytorch_fid.inception.FID_WEIGHTS_URL
INPUT_SIZE = 299  # pixels; pytorch-fid resizes every image to 299x299
NUM_CLASSES = 1008  # TF's 2015 Inception: 1000 ImageNet classes + 8 unused
POOL_DIM = 2048  # pool3 features
BN_EPS = 1e-3  # torchvision's BasicConv2d BatchNorm epsilon (TF's)
DEFAULT_BATCH_SIZE = 100  # images per jitted call
PRECISION = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------- network


class BasicConv2d(nn.Module):
    """torchvision's BasicConv2d: bias-free conv, BatchNorm (inference, eps 0.001), ReLU (NHWC)."""
    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)  # torch's (pad_h, pad_w), zeros on both sides

    @nn.compact
    def __call__(self, x):
        pad_h, pad_w = self.padding
        x = nn.Conv(self.features, self.kernel, strides=self.stride, padding=((pad_h, pad_h), (pad_w, pad_w)),
                    use_bias=False, precision=PRECISION, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x):
    """3x3 stride-1 average pool over the unpadded window (TF's; `count_include_pad=False`)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x, stride: int, pad: int):
    """3x3 max pool; padding is -inf, as torch's."""
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class FIDInceptionA(nn.Module):
    """Mixed_5b/5c/5d: (N, H, W, C) -> (N, H, W, 224 + pool_features)."""
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(64, (1, 1), name="branch1x1")(x)
        b5 = BasicConv2d(48, (1, 1), name="branch5x5_1")(x)
        b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a (torchvision's, unpatched): (N, 35, 35, 288) -> (N, 17, 17, 768)."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(384, (3, 3), stride=2, name="branch3x3")(x)
        bd = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3(x, stride=2, pad=0)], axis=-1)


class FIDInceptionC(nn.Module):
    """Mixed_6b..6e (factorised 7x7): (N, 17, 17, 768) -> (N, 17, 17, 768)."""
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = BasicConv2d(192, (1, 1), name="branch1x1")(x)
        b7 = BasicConv2d(c7, (1, 1), name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a (torchvision's, unpatched): (N, 17, 17, 768) -> (N, 8, 8, 1280)."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(192, (1, 1), name="branch3x3_1")(x)
        b3 = BasicConv2d(320, (3, 3), stride=2, name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3(x, stride=2, pad=0)], axis=-1)


class FIDInceptionE(nn.Module):
    """Mixed_7b (average pool) and Mixed_7c (`max_pool=True`): (N, 8, 8, C) -> (N, 8, 8, 2048)."""
    max_pool: bool

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(320, (1, 1), name="branch1x1")(x)
        b3 = BasicConv2d(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = BasicConv2d(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        pooled = _max_pool_3x3(x, stride=1, pad=1) if self.max_pool else _avg_pool_3x3(x)
        bp = BasicConv2d(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """pytorch-fid's FID Inception-v3 up to pool3, plus the 1008-way fc layer.

    Input: (N, H, W, 3) float32 in [-1, 1], H, W >= 75 (299 for the published numbers).
    Output: (pool (N, 2048), logits (N, 1008)), float32; pool is pytorch-fid's block-3 feature.
    """

    @nn.compact
    def __call__(self, x):
        x = BasicConv2d(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3(x, stride=2, pad=0)
        x = BasicConv2d(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3(x, stride=2, pad=0)
        x = FIDInceptionA(32, name="Mixed_5b")(x)
        x = FIDInceptionA(64, name="Mixed_5c")(x)
        x = FIDInceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = FIDInceptionC(128, name="Mixed_6b")(x)
        x = FIDInceptionC(160, name="Mixed_6c")(x)
        x = FIDInceptionC(160, name="Mixed_6d")(x)
        x = FIDInceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = FIDInceptionE(max_pool=False, name="Mixed_7b")(x)
        x = FIDInceptionE(max_pool=True, name="Mixed_7c")(x)
        pool = jnp.mean(x, axis=(1, 2))
        logits = nn.Dense(NUM_CLASSES, precision=PRECISION, name="fc")(pool)
        return pool, logits


# --------------------------------------------------------------------------- input


def interpolation_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Rows of torch's 1-D linear interpolation, `align_corners=False`, no antialiasing.

    Output pixel i samples the input at s = max(scale * (i + 0.5) - 0.5, 0), scale = in_size / out_size,
    with weights (1 - l, l) on pixels (floor(s), min(floor(s) + 1, in_size - 1)), l = s - floor(s).
    As torch's CPU kernel (`upsample_bilinear2d`), scale is float32 and s is one fused multiply-add
    (the exact product, rounded once to float32; float64 holds the product of two float32 exactly),
    which reproduces torch's weights bit for bit.

    Returns:
      (out_size, in_size) float32; each row sums to 1.
    """
    scale = np.float64(np.float32(in_size) / np.float32(out_size))
    src = np.maximum((scale * (np.arange(out_size) + 0.5) - 0.5).astype(np.float32), np.float32(0.0))
    lo = np.minimum(src.astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = np.clip(src - lo.astype(np.float32), 0.0, 1.0).astype(np.float32)
    matrix = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    np.add.at(matrix, (rows, lo), np.float32(1.0) - frac)
    np.add.at(matrix, (rows, hi), frac)
    return matrix


def preprocess(images):
    """pytorch-fid's input path for uint8 images (resize_input=True, normalize_input=True).

    Args:
      images: (N, H, W, 3) uint8 in [0, 255].

    Returns:
      (N, 299, 299, 3) float32 in [-1, 1]: x / 255, bilinear resize (align_corners=False), 2x - 1.
    """
    _, height, width, _ = images.shape
    rows = jnp.asarray(interpolation_matrix(height, INPUT_SIZE))
    cols = jnp.asarray(interpolation_matrix(width, INPUT_SIZE))
    x = images.astype(jnp.float32) / 255.0
    x = jnp.einsum("ph,nhwc->npwc", rows, x, precision=PRECISION)
    x = jnp.einsum("qw,npwc->npqc", cols, x, precision=PRECISION)
    return 2.0 * x - 1.0


def _as_rgb(images) -> np.ndarray:
    """Checks a uint8 NHWC batch and repeats a single channel to 3 (as PIL's convert('RGB'))."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3) or not len(images):
        raise ValueError(f"extract: expected a non-empty (N, H, W, 1 or 3) uint8 batch, got {images.dtype} "
                         f"{images.shape}; convert samples to uint8 NHWC first")
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def make_extractor(variables, batch_size: int = DEFAULT_BATCH_SIZE) -> Callable[[np.ndarray], dict]:
    """The feature extractor of FID and IS on pytorch-fid's Inception.

    Args:
      variables: {"params", "batch_stats"} of `InceptionV3`, e.g. from `load_params`.
      batch_size: images per jitted call; the last batch is zero-padded to it, so each image size
        compiles once.

    Returns:
      extract(images) -> {"pool": (N, 2048) float64, "logits": (N, 1008) float64}, for
      images (N, H, W, 1 or 3) uint8 of any H, W (resized to 299x299 as pytorch-fid).
    """
    if batch_size < 1:
        raise ValueError(f"make_extractor: batch_size={batch_size} must be >= 1")
    model = InceptionV3()
    variables = jax.device_put(variables)
    features = jax.jit(lambda v, images: model.apply(v, preprocess(images)))

    def extract(images):
        images = _as_rgb(images)
        outputs = []
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            padded = np.pad(batch, ((0, batch_size - len(batch)), (0, 0), (0, 0), (0, 0)))
            outputs.append((len(batch), features(variables, padded)))
        pool = np.concatenate([np.asarray(p[:n]) for n, (p, _) in outputs])
        logits = np.concatenate([np.asarray(l[:n]) for n, (_, l) in outputs])
        return {"pool": pool.astype(np.float64), "logits": logits.astype(np.float64)}

    return extract


# --------------------------------------------------------------------------- weights

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER (pre-1.6 .pth files)
_LEGACY_PROTOCOL = 1001
_STORAGE_DTYPES = {  # torch.<Name>Storage -> little-endian numpy dtype of its elements
    "FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "LongStorage": "<i8",
    "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1", "BoolStorage": "?",
}


@dataclasses.dataclass(frozen=True)
class _Storage:
    """A torch storage named in the pickle: its key in the file and its element dtype."""
    key: str
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """A strided view of a storage (`torch._utils._rebuild_tensor_v2`'s arguments), in elements."""
    storage: _Storage
    offset: int
    shape: tuple
    stride: tuple


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *_requires_grad_hooks_metadata):
    return _Tensor(storage, storage_offset, tuple(size), tuple(stride))


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles a torch state dict into `_Tensor` placeholders; refuses every other global."""

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return np.dtype(_STORAGE_DTYPES[name])
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a plain tensor state dict; "
                                     "the torch-free reader only rebuilds dense tensors")

    def persistent_load(self, pid):
        # zip format: ("storage", dtype, key, location, numel); legacy adds view_metadata (None).
        if pid[0] != "storage" or (len(pid) > 5 and pid[5] is not None):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r} (storage views are not read)")
        return _Storage(key=str(pid[2]), dtype=pid[1])


def _materialize(tensor: _Tensor, storages: dict) -> np.ndarray:
    """A contiguous copy of the strided view `tensor` of its storage (numpy, native byte order)."""
    data = storages[tensor.storage.key]
    itemsize = data.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(data[tensor.offset:], shape=tensor.shape,
                                           strides=[s * itemsize for s in tensor.stride])
    return np.array(view, dtype=data.dtype.newbyteorder("="))


def _read_zip(path: str):
    """torch >= 1.6 format: a zip of <prefix>/data.pkl and one raw file per storage in <prefix>/data/."""
    with zipfile.ZipFile(path) as archive:
        pkl = next(name for name in archive.namelist() if name.endswith("data.pkl"))
        prefix = pkl[:-len("data.pkl")]
        unpickler = _StateDictUnpickler(archive.open(pkl))
        tensors = unpickler.load()
        storages = {t.storage.key: np.frombuffer(archive.read(f"{prefix}data/{t.storage.key}"), t.storage.dtype)
                    for t in tensors.values()}
    return tensors, storages


def _read_legacy(path: str):
    """torch < 1.6 format: pickles (magic, protocol, sys_info, object, storage keys), then per
    storage key an int64 element count and the raw little-endian elements."""
    with open(path, "rb") as f:
        unpickler = _StateDictUnpickler(f)
        magic, protocol, _sys_info = unpickler.load(), unpickler.load(), unpickler.load()
        if magic != _LEGACY_MAGIC or protocol != _LEGACY_PROTOCOL:
            raise ValueError(f"{path} is neither a zip nor a legacy torch file (magic {magic!r})")
        tensors = unpickler.load()
        dtypes = {t.storage.key: t.storage.dtype for t in tensors.values()}
        storages = {}
        for key in unpickler.load():
            numel = int(np.frombuffer(f.read(8), "<i8")[0])
            storages[key] = np.frombuffer(f.read(numel * dtypes[key].itemsize), dtypes[key])
    return tensors, storages


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads a `torch.save`d state dict of dense tensors without torch (zip or legacy format).

    Returns:
      {name: array} with torch's shapes and dtypes (float32 weights, int64 num_batches_tracked).
    """
    tensors, storages = _read_zip(path) if zipfile.is_zipfile(path) else _read_legacy(path)
    return {name: _materialize(t, storages) for name, t in tensors.items()}


def _flax_leaf(name: str, array: np.ndarray):
    """Maps one torch state-dict entry to (collection, flax path, array); None if Flax has no use for it."""
    *module, leaf = name.split(".")
    if leaf == "num_batches_tracked":
        return None
    if leaf == "weight" and array.ndim == 4:
        return "params", (*module, "kernel"), array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if leaf == "weight" and array.ndim == 2:
        return "params", (*module, "kernel"), array.T  # (out, in) -> (in, out)
    renamed = {"weight": ("params", "scale"), "bias": ("params", "bias"),
               "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
    if leaf not in renamed:
        return "unmapped", tuple(name.split(".")), array
    collection, flax_leaf = renamed[leaf]
    return collection, (*module, flax_leaf), array


def params_from_state_dict(state_dict: dict[str, np.ndarray]) -> dict:
    """Maps pytorch-fid's Inception state dict (`fid_inception_v3().state_dict()`) to Flax variables.

    Returns:
      {"params": ..., "batch_stats": ...} float32 for `InceptionV3`; every tensor is checked
      against the module's shapes (num_batches_tracked is dropped).
    """
    flat = {}
    for name, array in state_dict.items():
        mapped = _flax_leaf(name, np.asarray(array, np.float32))
        if mapped is not None:
            collection, path, value = mapped
            flat[(collection, *path)] = np.ascontiguousarray(value)
    expected = traverse_util.flatten_dict(jax.eval_shape(
        InceptionV3().init, jax.random.key(0), jnp.zeros((1, 75, 75, 3), jnp.float32)))
    missing = sorted("/".join(k) for k in expected.keys() - flat.keys())
    unexpected = sorted("/".join(k) for k in flat.keys() - expected.keys())
    wrong = sorted(f"{'/'.join(k)} {flat[k].shape} != {expected[k].shape}"
                   for k in expected.keys() & flat.keys() if flat[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(f"not pytorch-fid's FID Inception state dict: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, wrong shapes {wrong[:5]}; use pt_inception-2015-12-05-6726825d.pth "
                         f"from {FID_WEIGHTS_URL}")
    return traverse_util.unflatten_dict(flat)


def load_params(path: str) -> dict:
    """Flax variables of pytorch-fid's Inception from its weight file, read without torch.

    Args:
      path: local pt_inception-2015-12-05-6726825d.pth (config field eval.inception_path).

    Returns:
      {"params": ..., "batch_stats": ...} for `InceptionV3` / `make_extractor`.
    """
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(
            f"eval.inception_path={path!r} is not a file. FID/IS need pytorch-fid's Inception weights and "
            f"nothing is downloaded at run time: on a machine with internet fetch {FID_WEIGHTS_URL}, copy it "
            "here and set --config.eval.inception_path=/path/pt_inception-2015-12-05-6726825d.pth")
    return params_from_state_dict(load_torch_state_dict(path))
