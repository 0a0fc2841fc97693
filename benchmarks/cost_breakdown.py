"""Where the time and memory go: XLA's cost and memory analyses of the gradient and of each preset.

Usage (prints one markdown table per model)::

    python benchmarks/cost_breakdown.py --model vgg16 resnet50 --size 112 --batch 4

Work: the floating-point operations and the bytes accessed that XLA's cost analysis counts in the
compiled program, and their ratio to the input gradient's (a profile that does not depend on timing
noise: the relevance programs' extra convolutions show up here).

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
    from relevance_vs_gradient import programs, setup

    net, variables, x = setup(model, size, batch)
    result = {}
    for label, fn in programs(net).items():
        compiled = jax.jit(fn).lower(variables, x).compile()
        stats = compiled.memory_analysis()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        result[label] = [
            stats.temp_size_in_bytes / 2**20,
            stats.argument_size_in_bytes / 2**20,
            stats.output_size_in_bytes / 2**20,
            cost.get("flops", float("nan")) / 1e9,
            cost.get("bytes accessed", float("nan")) / 1e9,
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
        g_default = sum(default["gradient"][:3])
        g_plain = sum(plain["gradient"][:3])
        g_flops, g_bytes = default["gradient"][3:]
        print(f"**{model}**, {args.size}x{args.size}x3, batch {args.batch} (memory in MiB)\n")
        print(
            "| program | GFLOP | / gradient | GB accessed | / gradient | temp | arguments | output | total "
            "| / gradient | temp, scheduler flag | total, scheduler flag | / gradient |"
        )
        print("|---|" + "---:|" * 12)
        for label, (temp, argument, output, flops, accessed) in default.items():
            total = temp + argument + output
            p_total = sum(plain[label][:3])
            print(
                f"| {label} | {flops:.2f} | {flops / g_flops:.2f} "
                f"| {accessed:.2f} | {accessed / g_bytes:.2f} "
                f"| {temp:.1f} | {argument:.1f} | {output:.1f} | {total:.1f} | {total / g_default:.2f} "
                f"| {plain[label][0]:.1f} | {p_total:.1f} | {p_total / g_plain:.2f} |"
            )
        print(flush=True)


if __name__ == "__main__":
    main()
