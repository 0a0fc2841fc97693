"""Side by side with zennit: images/s of jaxdtd and zennit 1.0 on the same CNNs, rules and threads.

Usage (an optional benchmark: it needs torch and zennit, not torchvision; prints markdown tables)::

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install torch==2.13.0
    .venv-bench/bin/pip install --no-deps --ignore-requires-python zennit==1.0.0 click
    .venv-bench/bin/pip install -e .
    .venv-bench/bin/python benchmarks/compare_zennit.py --model vgg16 resnet18 resnet50 \\
        --size 112 --batch 4 --threads 2 --repeats 5

Models.  The jaxdtd side is ``jaxdtd.models.classic.VGG16`` / ``ResNet18`` / ``ResNet50`` with
``num_classes=1000`` (NHWC); the zennit side is a PyTorch twin of each (NCHW) with the same layers,
registered in data-flow order under the same names, and the Flax weights (random; BatchNorm
statistics made non-trivial) copied into it, so both compute the same function and the relevances can
be compared (the table's last column; ``--no-check`` skips it):

- VGG-16: 13 conv 3x3 + ReLU, five 2x2 max pools, then -- as jaxdtd's version, not torchvision's
  adaptive 7x7 pool + 7*7*512 flatten -- a global average (``AdaptiveAvgPool2d(1)``, Norm in both
  libraries), then 3 dense layers (512 -> 4096 -> 4096 -> 1000).
- ResNet-18 / ResNet-50: torchvision's layout (7x7/2 stem + BatchNorm + ReLU + 3x3/2 max pool, basic
  or bottleneck blocks with the stride on the 3x3, 1x1 conv + BatchNorm projection shortcuts, global
  average pool, dense head), BatchNorm in eval mode.  The residual add is a ``zennit.layer.Sum`` over
  the two branches stacked on a new last axis (zennit's layer map gives it Norm; jaxdtd gives its add
  of two data values Norm).  zennit's ``ResNetCanonizer`` matches torchvision's block classes, which
  are absent here, so the twin is written with the ``Sum`` module already in place and the canonizer
  list is built by hand: ``[SequentialMergeBatchNorm()]``, which merges every BatchNorm into the
  convolution registered right before it (hence the registration order conv1, bn1, ..., shortcut_conv,
  shortcut_bn).  jaxdtd folds the same BatchNorms into the same convolutions by itself.

Rules.  Each library's own preset with the same arguments: ``EpsilonPlusFlat``, ``EpsilonGammaBox(low=0,
high=1)``, ``EpsilonPlus`` and ``EpsilonAlpha2Beta1``, plus the plain input gradient.  The first-layer
rules come from each preset: zennit's ``EpsilonGammaBox`` puts ZBox on the first ``Convolution`` and
``EpsilonPlusFlat`` Flat on the first linear module, which for these CNNs is the first convolution, the
one affine layer that reads the input (jaxdtd's ``first``).  Inputs are uniform in [0, 1) (the ZBox box),
the target of each sample is its arg-max class, and the output relevance is ``output * onehot(target)``
in both: zennit's ``Gradient(model, composite, attr_output=lambda out: out * onehot)``, jaxdtd's jitted
``explain(model.apply, variables, x, target=target, composite=...)``; the gradient rows are the
vector-Jacobian product with that same ``output * onehot`` (``Gradient(model)`` / ``jax.vjp``).
The relevances agree to ~1e-6 of their largest value; the plain gradient of the random VGG-16 only to
~5e-3 (at 32x32): its positive and negative paths nearly cancel, and XLA's float32 gradient is as far
from XLA's own float64 one (torch's float32 is within 1e-6 of float64 there).

Timing.  The jaxdtd programs are jitted (trace + compile time reported, not counted); every zennit
composite is registered once, on its own copy of the twin, for the whole run (as in a ``with
Gradient(...)`` block), so the canonizer's merge is not counted either.  After ``--warmup`` calls of
every program, the programs run interleaved ``--repeats`` times (zennit and jaxdtd alternating); we
report images/s from the median wall time, jaxdtd's throughput over zennit's, and each library's
relevance time over its own gradient's.

Threads.  ``torch.set_num_threads(threads)``.  XLA 0.10's CPU client has no thread-count option: there is
no ``intra_op_parallelism_threads`` flag (``--intra_op_parallelism_threads=1`` in ``XLA_FLAGS`` aborts
with "Unknown flag"; the often quoted form without dashes is silently ignored), and
``--xla_cpu_multi_thread_eigen=false`` is accepted but, measured per thread on jax 0.10.2, does not
keep convolutions and dots on one thread.  XLA sizes its pool by the schedulable CPUs, so when
``--threads`` is below the CPUs this process may use, the process (torch included) is pinned to the
first ``threads`` of them with ``os.sched_setaffinity`` before torch and jax are imported.  With
``--threads`` equal to the CPU count (2 on the developer machines) nothing is pinned and both use them all.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.metadata
import importlib.util
import os
import platform
import statistics
import sys
import time
import types

PRESETS = ("EpsilonPlusFlat", "EpsilonGammaBox", "EpsilonPlus", "EpsilonAlpha2Beta1")
BN_EPS = 1e-5


def set_threads(threads: int) -> str:
    """Pin the process to ``threads`` CPUs when fewer than it may use (before torch/jax start)."""
    allowed = sorted(os.sched_getaffinity(0))
    if threads < len(allowed):
        os.sched_setaffinity(0, set(allowed[:threads]))
        return f"pinned to CPUs {allowed[:threads]} (of {len(allowed)})"
    if threads > len(allowed):
        return f"{len(allowed)} schedulable CPUs, fewer than --threads {threads}: XLA uses {len(allowed)}"
    return f"all {len(allowed)} schedulable CPUs, not pinned"


def install_import_stubs() -> None:
    """zennit imports torchvision (``zennit.types``, ``zennit.torchvision``) and PIL (``zennit.image``)
    at import time; nothing used here needs them.  When absent, register minimal stand-ins for the names
    it imports, fresh classes that none of our modules is an instance of."""
    import torch

    if importlib.util.find_spec("torchvision") is None:
        torchvision = types.ModuleType("torchvision")
        ops = types.ModuleType("torchvision.ops")
        models = types.ModuleType("torchvision.models")
        resnet = types.ModuleType("torchvision.models.resnet")
        torchvision.__path__, models.__path__ = [], []
        for module, name in ((ops, "FrozenBatchNorm2d"), (resnet, "Bottleneck"), (resnet, "BasicBlock")):
            setattr(
                module, name, type(name, (torch.nn.Module,), {"__doc__": "Stand-in; never instantiated."})
            )
        torchvision.ops, torchvision.models, models.resnet = ops, models, resnet
        sys.modules.update(
            {
                "torchvision": torchvision,
                "torchvision.ops": ops,
                "torchvision.models": models,
                "torchvision.models.resnet": resnet,
            }
        )
    if importlib.util.find_spec("PIL") is None:
        pil, image = types.ModuleType("PIL"), types.ModuleType("PIL.Image")
        pil.__path__, pil.Image = [], image
        sys.modules.update({"PIL": pil, "PIL.Image": image})


# ---------------------------------------------------------------------------------------------------------
# PyTorch twins of jaxdtd.models.classic (NCHW).  Attribute names equal the Flax module names and
# registration order equals data-flow order (SequentialMergeBatchNorm and the first-layer rule rely on it).
# ---------------------------------------------------------------------------------------------------------


def torch_twins():
    import torch
    from torch import nn
    from zennit.layer import Sum

    class VGG16Twin(nn.Module):
        """jaxdtd's VGG16: 13 conv + ReLU, 5 max pools, global mean, fc1/fc2 (+ReLU), fc3."""

        def __init__(self, num_classes: int = 1000):
            super().__init__()
            cfg = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
            self.order: list[str] = []
            cin, conv, pool = 3, 0, 0
            for item in cfg:
                if item == "M":
                    self._add(f"pool{pool}", nn.MaxPool2d(2, 2))
                    pool += 1
                    continue
                self._add(f"conv{conv}", nn.Conv2d(cin, item, 3, padding=1))
                self._add(f"relu{conv}", nn.ReLU())
                cin, conv = item, conv + 1
            self._add("gap", nn.AdaptiveAvgPool2d(1))
            self._add("flatten", nn.Flatten(1))
            self._add("fc1", nn.Linear(512, 4096))
            self._add("fc1_relu", nn.ReLU())
            self._add("fc2", nn.Linear(4096, 4096))
            self._add("fc2_relu", nn.ReLU())
            self._add("fc3", nn.Linear(4096, num_classes))

        def _add(self, name: str, module: nn.Module) -> None:
            setattr(self, name, module)
            self.order.append(name)

        def forward(self, x):
            for name in self.order:
                x = getattr(self, name)(x)
            return x

    class BasicBlockTwin(nn.Module):
        expansion = 1

        def __init__(self, cin: int, features: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, features, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(features, eps=BN_EPS)
            self.relu1 = nn.ReLU()
            self.conv2 = nn.Conv2d(features, features, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(features, eps=BN_EPS)
            self.projection = stride != 1 or cin != features
            if self.projection:
                self.shortcut_conv = nn.Conv2d(cin, features, 1, stride, bias=False)
                self.shortcut_bn = nn.BatchNorm2d(features, eps=BN_EPS)
            self.add = Sum(dim=-1)
            self.relu_out = nn.ReLU()

        def forward(self, x):
            y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
            residual = self.shortcut_bn(self.shortcut_conv(x)) if self.projection else x
            return self.relu_out(self.add(torch.stack([y, residual], dim=-1)))

    class BottleneckTwin(nn.Module):
        expansion = 4

        def __init__(self, cin: int, features: int, stride: int):
            super().__init__()
            out = 4 * features
            self.conv1 = nn.Conv2d(cin, features, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(features, eps=BN_EPS)
            self.relu1 = nn.ReLU()
            self.conv2 = nn.Conv2d(features, features, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(features, eps=BN_EPS)
            self.relu2 = nn.ReLU()
            self.conv3 = nn.Conv2d(features, out, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(out, eps=BN_EPS)
            self.projection = stride != 1 or cin != out
            if self.projection:
                self.shortcut_conv = nn.Conv2d(cin, out, 1, stride, bias=False)
                self.shortcut_bn = nn.BatchNorm2d(out, eps=BN_EPS)
            self.add = Sum(dim=-1)
            self.relu_out = nn.ReLU()

        def forward(self, x):
            y = self.relu1(self.bn1(self.conv1(x)))
            y = self.relu2(self.bn2(self.conv2(y)))
            y = self.bn3(self.conv3(y))
            residual = self.shortcut_bn(self.shortcut_conv(x)) if self.projection else x
            return self.relu_out(self.add(torch.stack([y, residual], dim=-1)))

    class ResNetTwin(nn.Module):
        """jaxdtd's ResNet with the default 7x7/2 stem and 3x3/2 max pool."""

        def __init__(self, stage_sizes, block, num_classes: int = 1000, width: int = 64):
            super().__init__()
            self.stem_conv = nn.Conv2d(3, width, 7, 2, 3, bias=False)
            self.stem_bn = nn.BatchNorm2d(width, eps=BN_EPS)
            self.stem_relu = nn.ReLU()
            self.stem_pool = nn.MaxPool2d(3, 2, 1)
            self.blocks: list[str] = []
            cin = width
            for i, blocks in enumerate(stage_sizes):
                for j in range(blocks):
                    name = f"stage{i + 1}_block{j + 1}"
                    stride = 2 if i > 0 and j == 0 else 1
                    setattr(self, name, block(cin, width * 2**i, stride))
                    self.blocks.append(name)
                    cin = width * 2**i * block.expansion
            self.gap = nn.AdaptiveAvgPool2d(1)
            self.head = nn.Linear(cin, num_classes)

        def forward(self, x):
            x = self.stem_pool(self.stem_relu(self.stem_bn(self.stem_conv(x))))
            for name in self.blocks:
                x = getattr(self, name)(x)
            return self.head(self.gap(x).flatten(1))

    return {
        "vgg16": lambda: VGG16Twin(1000),
        "resnet18": lambda: ResNetTwin((2, 2, 2, 2), BasicBlockTwin),
        "resnet50": lambda: ResNetTwin((3, 4, 6, 3), BottleneckTwin),
    }


def copy_flax_weights(model, variables) -> None:
    """Flax -> twin: Conv2d weight = HWIO kernel as OIHW, Linear weight = kernel.T, BatchNorm
    scale/bias/mean/var.  Every parameter of the twin must be found (KeyError otherwise)."""
    import numpy as np
    import torch

    def lookup(tree, path: str):
        for part in path.split("."):
            tree = tree[part]
        return tree

    def tensor(array, transform=lambda a: a):
        return torch.from_numpy(np.array(transform(np.asarray(array, dtype=np.float32)), order="C"))

    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                p = lookup(variables["params"], name)
                to_torch = (
                    (lambda k: k.T)
                    if isinstance(module, torch.nn.Linear)
                    else (lambda k: k.transpose(3, 2, 0, 1))
                )
                module.weight.copy_(tensor(p["kernel"], to_torch))
                if module.bias is not None:
                    module.bias.copy_(tensor(p["bias"]))
            elif isinstance(module, torch.nn.BatchNorm2d):
                p, s = lookup(variables["params"], name), lookup(variables["batch_stats"], name)
                module.weight.copy_(tensor(p["scale"]))
                module.bias.copy_(tensor(p["bias"]))
                module.running_mean.copy_(tensor(s["mean"]))
                module.running_var.copy_(tensor(s["var"]))


def randomize_batch_norm(variables, seed: int = 2):
    """Non-trivial BatchNorm statistics and affine parameters (Flax initializes the identity), so that the
    value check exercises the folding: mean, shift ~ N(0, 0.1^2); var, scale ~ U[0.5, 1.5]."""
    import jax
    import numpy as np

    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        keys = [str(getattr(k, "key", k)) for k in path]
        if not any("bn" in k for k in keys):
            return leaf
        normal = lambda: rng.normal(0.0, 0.1, leaf.shape)
        uniform = lambda: rng.uniform(0.5, 1.5, leaf.shape)
        value = {"mean": normal, "var": uniform, "scale": uniform, "bias": normal}[keys[-1]]()
        return jax.numpy.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, variables)


def zennit_composite(preset: str, canonize: bool):
    from zennit import composites as zc
    from zennit.canonizers import SequentialMergeBatchNorm

    canonizers = [SequentialMergeBatchNorm()] if canonize else None
    if preset == "EpsilonGammaBox":
        return zc.EpsilonGammaBox(low=0.0, high=1.0, canonizers=canonizers)
    return getattr(zc, preset)(canonizers=canonizers)


def jaxdtd_composite(preset: str):
    from jaxdtd import composites as C

    return C.EpsilonGammaBox(0.0, 1.0) if preset == "EpsilonGammaBox" else getattr(C, preset)()


# ---------------------------------------------------------------------------------------------------------
# Benchmark
# ---------------------------------------------------------------------------------------------------------


def benchmark(name: str, size: int, batch: int, repeats: int, warmup: int, check: bool) -> list[str]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from zennit.attribution import Gradient

    import jaxdtd as dtd
    from jaxdtd.models import classic

    flax_model = {
        "vgg16": lambda: classic.VGG16(num_classes=1000),
        "resnet18": lambda: classic.ResNet18(num_classes=1000),
        "resnet50": lambda: classic.ResNet50(num_classes=1000),
    }[name]()
    x = jax.random.uniform(jax.random.PRNGKey(0), (batch, size, size, 3))
    variables = randomize_batch_norm(jax.jit(flax_model.init)(jax.random.PRNGKey(1), x))
    target = jnp.argmax(jax.jit(flax_model.apply)(variables, x), axis=-1)

    twin = torch_twins()[name]()
    copy_flax_weights(twin, variables)
    twin.eval()
    x_torch = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
    onehot = torch.nn.functional.one_hot(torch.from_numpy(np.array(target)).long(), 1000).float()
    canonize = any(isinstance(m, torch.nn.BatchNorm2d) for m in twin.modules())

    def attr_output(out):
        return out * onehot

    # zennit: one registered attributor per program, each on its own copy of the twin
    attributors = {"gradient": Gradient(twin, attr_output=attr_output)}
    for preset in PRESETS:
        attributors[preset] = Gradient(copy.deepcopy(twin), zennit_composite(preset, canonize), attr_output)

    def jax_gradient(v, x, t):
        y, vjp = jax.vjp(lambda x: flax_model.apply(v, x), x)
        return vjp(y * jax.nn.one_hot(t, y.shape[-1], dtype=y.dtype))[0]

    jax_programs = {"gradient": jax_gradient}
    for preset in PRESETS:
        comp = jaxdtd_composite(preset)
        jax_programs[preset] = lambda v, x, t, comp=comp: dtd.explain(
            flax_model.apply, v, x, target=t, composite=comp
        )[0]

    compiled, compile_s, deviation = {}, {}, {}
    for label, fn in jax_programs.items():
        start = time.perf_counter()
        compiled[label] = jax.jit(fn).lower(variables, x, target).compile()
        compile_s[label] = time.perf_counter() - start

    def run_zennit(label):
        return attributors[label](x_torch)[1]

    def run_jax(label):
        return jax.block_until_ready(compiled[label](variables, x, target))

    with contextlib.ExitStack() as stack:
        for attributor in attributors.values():
            stack.enter_context(attributor)  # registers the composite (and applies the canonizers) once
        for label in jax_programs:
            for _ in range(warmup):
                r_zennit, r_jax = run_zennit(label), run_jax(label)
            r_zennit = r_zennit.detach().numpy().transpose(0, 2, 3, 1)
            r_jax = np.asarray(r_jax)
            if r_zennit.shape != r_jax.shape:
                raise AssertionError(f"{name} {label}: zennit {r_zennit.shape} vs jaxdtd {r_jax.shape}")
            scale = np.abs(r_zennit).max()
            deviation[label] = np.abs(r_jax - r_zennit).max() / scale if check and scale > 0 else float("nan")
        times = {label: ([], []) for label in jax_programs}
        for _ in range(repeats):
            for label in jax_programs:
                for fn, ts in zip((run_zennit, run_jax), times[label], strict=True):
                    start = time.perf_counter()
                    fn(label)
                    ts.append(time.perf_counter() - start)

    median = {label: tuple(statistics.median(ts) for ts in pair) for label, pair in times.items()}
    grad_z, grad_j = median["gradient"]
    lines = [
        f"**{name}**, {size}x{size}x3, batch {batch}, {repeats} interleaved runs after {warmup} warm-up "
        f"(relevance shape NHWC {tuple(r_jax.shape)} in both)",
        "",
        "| program | zennit img/s | jaxdtd img/s | jaxdtd / zennit | zennit / its gradient "
        "| jaxdtd / its gradient | jaxdtd compile s | max \\|ΔR\\| / max \\|R\\| |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, (t_z, t_j) in median.items():
        lines.append(
            f"| {label} | {batch / t_z:.2f} | {batch / t_j:.2f} | {t_z / t_j:.2f} | {t_z / grad_z:.2f} | "
            f"{t_j / grad_j:.2f} | {compile_s[label]:.1f} | {deviation[label]:.1e} |"
        )
    lines += [
        "",
        "img/s from the median wall time; ΔR: the largest difference between the two libraries' input "
        "relevance (same weights, float32), relative to zennit's largest |R|.",
    ]
    return lines


def machine() -> str:
    processor = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            processor = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = ""
    try:
        with open("/proc/meminfo") as f:
            kib = int(next(line.split()[1] for line in f if line.startswith("MemTotal")))
        memory = f", {kib / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    return f"{platform.platform()}, {processor or platform.machine()}, {os.cpu_count()} cores{memory}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", nargs="+", default=["vgg16", "resnet18", "resnet50"])
    parser.add_argument("--size", nargs="+", type=int, default=[112])
    parser.add_argument("--batch", nargs="+", type=int, default=[4])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--no-check", dest="check", action="store_false", help="skip comparing the relevances' values"
    )
    args = parser.parse_args()
    for model in args.model:
        if model not in ("vgg16", "resnet18", "resnet50"):
            parser.error(f"unknown model {model!r} (vgg16, resnet18, resnet50)")
    if args.threads < 1 or args.repeats < 1 or args.warmup < 1:
        parser.error("--threads, --repeats and --warmup must be at least 1")

    pinning = set_threads(args.threads)  # before torch and jax create their thread pools
    import torch

    torch.set_num_threads(args.threads)
    install_import_stubs()
    import jax
    import zennit  # noqa: F401  (fails here, not mid-run, when it cannot be imported)

    versions = ", ".join(
        f"{package} {importlib.metadata.version(package)}"
        for package in ("torch", "zennit", "jax", "jaxlib", "flax", "numpy", "jaxdtd")
    )
    print(
        f"{time.strftime('%Y-%m-%d %H:%M')}, {machine()}\n"
        f"Python {platform.python_version()}, {versions}\n"
        f"threads {args.threads}: torch.get_num_threads() = {torch.get_num_threads()}; "
        f"XLA {jax.devices()[0].platform} backend, {pinning}\n",
        flush=True,
    )
    for name in args.model:
        for size in args.size:
            for batch in args.batch:
                lines = benchmark(name, size, batch, args.repeats, args.warmup, args.check)
                print("\n".join(lines) + "\n", flush=True)


if __name__ == "__main__":
    main()
