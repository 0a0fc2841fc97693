"""Relevance costs what a gradient costs: time and memory of each preset vs ``jax.grad``.

Usage (prints a markdown table)::

    python benchmarks/relevance_vs_gradient.py [--size 64] [--batch 8] [--repeats 7]

Model: a VGG-style linen CNN (conv3x3 blocks 32-64-128 with max pooling, two dense layers), NHWC.
Every program is jitted; runs are interleaved after a warm-up; we report median and min wall time,
the ratio of the median to the input gradient's, trace+compile time, and XLA's memory analysis of
the compiled program (temporary + output bytes).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

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


def programs(model, composites):
    def gradient(v, x):
        return jax.grad(lambda x: model.apply(v, x)[:, 0].sum())(x)

    out = {"forward": lambda v, x: model.apply(v, x), "gradient": gradient}
    for name, comp in composites.items():
        out[name] = lambda v, x, comp=comp: dtd.explain(model.apply, v, x, target=0, composite=comp)[0]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    model = VGGish()
    x = jax.random.uniform(jax.random.PRNGKey(0), (args.batch, args.size, args.size, 3))
    variables = model.init(jax.random.PRNGKey(1), x)
    composites = {
        "Epsilon": R.Epsilon(),
        "EpsilonPlus": C.EpsilonPlus(),
        "EpsilonPlusFlat": C.EpsilonPlusFlat(),
        "EpsilonGammaBox": C.EpsilonGammaBox(0.0, 1.0),
        "EpsilonAlpha2Beta1": C.EpsilonAlpha2Beta1(),
        "DeepTaylor": C.DeepTaylor(0.0, 1.0),
    }
    compiled, compile_s, memory = {}, {}, {}
    for name, fn in programs(model, composites).items():
        start = time.perf_counter()
        lowered = jax.jit(fn).lower(variables, x)
        compiled[name] = lowered.compile()
        compile_s[name] = time.perf_counter() - start
        analysis = compiled[name].memory_analysis()
        memory[name] = (analysis.temp_size_in_bytes + analysis.output_size_in_bytes) if analysis else float("nan")
        jax.block_until_ready(compiled[name](variables, x))  # warm-up
    times: dict[str, list[float]] = {name: [] for name in compiled}
    for _ in range(args.repeats):
        for name, fn in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(variables, x))
            times[name].append(time.perf_counter() - start)

    grad_median = statistics.median(times["gradient"])
    print(
        f"VGGish {args.size}x{args.size}x3, batch {args.batch}, {jax.devices()[0].platform}, jax {jax.__version__}, "
        f"{platform.processor() or platform.machine()}, {jax.local_device_count()} device(s)\n"
    )
    print("| program | median ms | min ms | / gradient | trace+compile s | temp+out MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, ts in times.items():
        print(
            f"| {name} | {1e3 * statistics.median(ts):.1f} | {1e3 * min(ts):.1f} | "
            f"{statistics.median(ts) / grad_median:.2f} | {compile_s[name]:.2f} | {memory[name] / 2**20:.1f} |"
        )


if __name__ == "__main__":
    main()
