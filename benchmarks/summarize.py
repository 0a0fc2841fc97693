"""One summary table from the tables ``relevance_vs_gradient.py --out FILE`` wrote.

    python benchmarks/summarize.py benchmarks/results-cpu-2026-11-28.md

Per model, size, dtype and batch: each preset's median time over the gradient's, and the largest
memory and trace+compile ratios to the gradient among all six presets.
"""

from __future__ import annotations

import re
import sys

PRESETS = ["Epsilon", "EpsilonPlus", "EpsilonPlusFlat", "DeepTaylor", "EpsilonGammaBox", "EpsilonAlpha2Beta1"]
HEADER = re.compile(r"^\*\*(\S+)\*\*, (\d+)x\d+x3, (\w+), batch (\d+),")


def parse(text: str) -> list[tuple[tuple[str, int, str, int], dict[str, list[float]]]]:
    blocks = []
    for line in text.splitlines():
        match = HEADER.match(line)
        if match:
            name, size, dtype, batch = match.groups()
            blocks.append(((name, int(size), dtype, int(batch)), {}))
        elif line.startswith("| ") and blocks and not line.startswith("| program"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            # program, median, min, images/s, /gradient, compile, /gradient, MiB, /gradient
            blocks[-1][1][cells[0]] = [float(c) for c in cells[1:]]
    return blocks


def main() -> None:
    blocks = parse(open(sys.argv[1]).read())
    print(
        "| model | size | dtype | batch | gradient img/s | "
        + " | ".join(PRESETS)
        + " | memory (max) | compile (max) |"
    )
    print("|---|---:|---|---:|---:|" + "---:|" * len(PRESETS) + "---:|---:|")
    for (name, size, dtype, batch), rows in blocks:
        ratios = [f"{rows[p][3]:.2f}" for p in PRESETS]
        memory = max(rows[p][7] for p in PRESETS)
        compile_ = max(rows[p][5] for p in PRESETS)
        print(
            f"| {name} | {size} | {dtype} | {batch} | {rows['gradient'][2]:.1f} | "
            + " | ".join(ratios)
            + f" | {memory:.2f} | {compile_:.2f} |"
        )


if __name__ == "__main__":
    main()
