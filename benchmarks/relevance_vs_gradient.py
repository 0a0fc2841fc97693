"""Relevance costs what a gradient costs: time and memory of each preset vs ``jax.grad``.

Usage (prints a markdown table per configuration)::

    python benchmarks/relevance_vs_gradient.py --model vgg16 resnet50 --size 112 224 --batch 4
    python benchmarks/relevance_vs_gradient.py --model vggish --size 64 --batch 8   # quick

Models come from :mod:`jaxdtd.models` (``vgg16``, ``resnet18``, ``resnet50``, ``efficientnet_lite0``
with random weights) or ``vggish`` (a small VGG-style CNN defined here).  Every program is jitted;
after a warm-up the programs run interleaved ``--repeats`` times; we report the median and min wall
time, the median's ratio to the input gradient's, trace+compile time (and, in the last columns, split
into tracing with lowering -- jaxdtd's analysis and plan included -- and XLA's compilation), XLA's
memory analysis of the
compiled program (temporary + argument + output bytes), and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import time

import flax.linen as nn
import jax

import jaxdtd as dtd
from jaxdtd import composites as C
from jaxdtd import rules as R


class VGGish(nn.Module):
    widths: tuple[int, ...] = (32, 64, 128)

    @nn.compact
    def __call__(self, x):
        for width in self.widths:
            x = nn.relu(nn.Conv(width, (3, 3))(x))
            x = nn.relu(nn.Conv(width, (3, 3))(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(256)(x))
        return nn.Dense(10)(x)


def make_model(name: str):
    from jaxdtd.models import classic, efficientnet

    return {
        "vggish": VGGish,
        "vgg16": lambda: classic.VGG16(num_classes=1000),
        "resnet18": lambda: classic.ResNet18(num_classes=1000),
        "resnet50": lambda: classic.ResNet50(num_classes=1000),
        "efficientnet_lite0": lambda: efficientnet.EfficientNetLite0(),
    }[name]()


def presets() -> dict:
    return {
        "Epsilon": R.Epsilon(),
        "EpsilonPlus": C.EpsilonPlus(),
        "EpsilonPlusFlat": C.EpsilonPlusFlat(),
        "EpsilonGammaBox": C.EpsilonGammaBox(0.0, 1.0),
        "EpsilonAlpha2Beta1": C.EpsilonAlpha2Beta1(),
        "DeepTaylor": C.DeepTaylor(0.0, 1.0),
    }


def programs(model, chosen: list[str] | None = None) -> dict:
    """``forward``, ``gradient`` and the relevance of each preset (those named in ``chosen``, or all)."""

    def gradient(v, x):
        return jax.grad(lambda x: model.apply(v, x)[:, 0].sum())(x)

    out = {"forward": lambda v, x: model.apply(v, x), "gradient": gradient}
    for name, comp in presets().items():
        if chosen is not None and name not in chosen:
            continue
        out[name] = lambda v, x, comp=comp: dtd.explain(model.apply, v, x, target=0, composite=comp)[0]
    return out


def setup(name: str, size: int, batch: int, dtype: str = "float32"):
    """The model, its random variables and a uniform ``(batch, size, size, 3)`` input, in ``dtype``."""
    model = make_model(name)
    x = jax.random.uniform(jax.random.PRNGKey(0), (batch, size, size, 3))
    variables = jax.jit(model.init)(jax.random.PRNGKey(1), x)
    x, variables = jax.tree_util.tree_map(lambda a: a.astype(dtype), (x, variables))
    return model, variables, x


def benchmark(
    name: str, size: int, batch: int, repeats: int, dtype: str = "float32", chosen: list[str] | None = None
) -> list[str]:
    model, variables, x = setup(name, size, batch, dtype)
    compiled, compile_s, trace_s, memory = {}, {}, {}, {}
    for label, fn in programs(model, chosen).items():
        start = time.perf_counter()
        lowered = jax.jit(fn).lower(variables, x)  # trace (jaxdtd's analysis and plan included) + lower
        trace_s[label] = time.perf_counter() - start
        compiled[label] = lowered.compile()
        compile_s[label] = time.perf_counter() - start
        stats = compiled[label].memory_analysis()
        memory[label] = (
            stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes
            if stats is not None
            else float("nan")
        )
        jax.block_until_ready(compiled[label](variables, x))  # warm-up
    times: dict[str, list[float]] = {label: [] for label in compiled}
    for _ in range(repeats):
        for label, fn in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(variables, x))
            times[label].append(time.perf_counter() - start)
    grad_median = statistics.median(times["gradient"])
    grad_memory = memory["gradient"]
    grad_compile = compile_s["gradient"]
    xla_s = {label: compile_s[label] - trace_s[label] for label in compile_s}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines = [
        f"**{name}**, {size}x{size}x3, {dtype}, batch {batch}, {repeats} interleaved runs "
        f"(process peak RSS {rss:.0f} MiB)",
        "",
        "| program | median ms | min ms | images/s | / gradient | compile s | / gradient "
        "| XLA MiB | / gradient | trace s | / gradient | XLA compile s | / gradient |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, ts in times.items():
        median = statistics.median(ts)
        lines.append(
            f"| {label} | {1e3 * median:.1f} | {1e3 * min(ts):.1f} | {batch / median:.1f} | "
            f"{median / grad_median:.2f} | "
            f"{compile_s[label]:.2f} | {compile_s[label] / grad_compile:.2f} | "
            f"{memory[label] / 2**20:.1f} | {memory[label] / grad_memory:.2f} | "
            f"{trace_s[label]:.2f} | {trace_s[label] / trace_s['gradient']:.2f} | "
            f"{xla_s[label]:.2f} | {xla_s[label] / xla_s['gradient']:.2f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", nargs="+", default=["vggish"])
    parser.add_argument("--size", nargs="+", type=int, default=[64])
    parser.add_argument("--batch", nargs="+", type=int, default=[8])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", nargs="+", default=["float32"], help="float32 and/or bfloat16")
    parser.add_argument("--presets", nargs="+", choices=list(presets()), help="default: every preset")
    parser.add_argument("--out", help="also append the tables to this file")
    args = parser.parse_args()

    def emit(text: str) -> None:
        print(text, flush=True)
        if args.out:
            with open(args.out, "a") as handle:
                handle.write(text + "\n")

    emit(
        f"{time.strftime('%Y-%m-%d')}, {jax.devices()[0].platform} ({jax.devices()[0].device_kind}), "
        f"{jax.local_device_count()} device(s), {platform.machine()}, Python {platform.python_version()}, "
        f"jax {jax.__version__}\n"
    )
    for name in args.model:
        for size in args.size:
            for batch in args.batch:
                for dtype in args.dtype:
                    emit("\n".join(benchmark(name, size, batch, args.repeats, dtype, args.presets)) + "\n")


if __name__ == "__main__":
    main()
