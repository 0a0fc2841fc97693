"""Where the memory goes: XLA's memory analysis of the gradient and of each preset's program.

Usage (prints one markdown table per model)::

    python benchmarks/memory_breakdown.py --model vgg16 resnet50 --size 112 --batch 4

For each program (jitted input gradient, every preset of ``relevance_vs_gradient.py``) it reports the
temporary, argument and output bytes of the compiled program, under XLA's default CPU scheduler and
again with ``--xla_cpu_enable_concurrency_optimized_scheduler=false`` (each setting in its own
subprocess, since XLA reads its flags once per process).  The default scheduler computes work that
depends only on the parameters (a convolution's transposed kernel, a rule's modified weights) at the
start of the program, where it stays alive until its use; the second column shows what the same
programs need without that.  Nothing is executed, only compiled.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def measure(model: str, size: int, batch: int) -> dict[str, list[float]]:
    import jax

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from relevance_vs_gradient import make_model, programs

    net = make_model(model)
    x = jax.random.uniform(jax.random.PRNGKey(0), (batch, size, size, 3))
    variables = jax.jit(net.init)(jax.random.PRNGKey(1), x)
    result = {}
    for label, fn in programs(net).items():
        stats = jax.jit(fn).lower(variables, x).compile().memory_analysis()
        result[label] = [
            stats.temp_size_in_bytes / 2**20,
            stats.argument_size_in_bytes / 2**20,
            stats.output_size_in_bytes / 2**20,
        ]
    return result


def run_child(model: str, size: int, batch: int, flag: str) -> dict[str, list[float]]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flag).strip()
    out = subprocess.run(
        [sys.executable, __file__, "--child", model, str(size), str(batch)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        print(json.dumps(measure(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", nargs="+", default=["vgg16"])
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    for model in args.model:
        default = run_child(model, args.size, args.batch, "")
        plain = run_child(model, args.size, args.batch, FLAG)
        g_default = sum(default["gradient"])
        g_plain = sum(plain["gradient"])
        print(f"**{model}**, {args.size}x{args.size}x3, batch {args.batch} (MiB)\n")
        print(
            "| program | temp | arguments | output | total | / gradient "
            "| temp, scheduler flag | total, scheduler flag | / gradient |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for label, (temp, argument, output) in default.items():
            total = temp + argument + output
            p_total = sum(plain[label])
            print(
                f"| {label} | {temp:.1f} | {argument:.1f} | {output:.1f} | {total:.1f} | "
                f"{total / g_default:.2f} | {plain[label][0]:.1f} | {p_total:.1f} | {p_total / g_plain:.2f} |"
            )
        print(flush=True)


if __name__ == "__main__":
    main()
