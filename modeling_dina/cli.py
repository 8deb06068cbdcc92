"""The `dina` command: convert, score, score-dataset, cache, train, eval, demo, align, serve, app."""

from __future__ import annotations

import argparse


def _add_convert(subparsers):
    p = subparsers.add_parser("convert", help="import a checkpoint in the authors' released layout")
    p.add_argument("released_dir", help="folder with config.json and checkpoint/{backbone_lora,rm_head.pt}")
    p.add_argument("--base", required=True, help="diffusers pipeline folder or Hub id of the base (SD3, FLUX, Z-Image)")
    p.add_argument("--output", required=True, help="where to write the DiNa folder")
    p.add_argument("--max-sequence-length", type=int, default=None, help="prompt tokens (default: the release's 128)")
    p.set_defaults(func=_run_convert)


def _run_convert(args):
    from .convert import convert_released_checkpoint

    overrides = {} if args.max_sequence_length is None else {"max_sequence_length": args.max_sequence_length}
    convert_released_checkpoint(args.released_dir, args.base, args.output, **overrides)
    print(f"wrote {args.output}")


def _add_demo(subparsers):
    p = subparsers.add_parser("demo", help="the Shapes world: best-of-N with DiNa-LRM, offline, on a CPU")
    p.add_argument("--output", default="outputs/demo", help="folder for contact_sheet.png and demo.json")
    p.add_argument("--prompts", type=int, default=6, help="prompts shown on the contact sheet")
    p.add_argument("--candidates", type=int, default=4, help="candidates generated per prompt (N)")
    p.add_argument("--eval-prompts", type=int, default=64, help="held-out prompts for the best-of-N figure")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--aligned",
        nargs="?",
        const="",
        default=None,
        metavar="LORA_DIR",
        help="also run the aligned generator (the shipped LoRA, or the one at LORA_DIR) on the same prompts and seeds",
    )
    p.set_defaults(func=_run_demo)


def _run_demo(args):
    from .shapes.demo import run_demo

    run_demo(
        args.output,
        num_prompts=args.prompts,
        num_candidates=args.candidates,
        eval_prompts=args.eval_prompts,
        seed=args.seed,
        aligned=args.aligned or None,
        compare_aligned=args.aligned is not None,
    )


def build_parser() -> argparse.ArgumentParser:
    from .alignment.cli import add_align_parser
    from .app.cli import add_app_parser
    from .cli_eval import add_eval_parser
    from .cli_score import add_score_parser
    from .serving.cli import add_serve_parser
    from .training.cli import add_cache_parser, add_train_parser

    parser = argparse.ArgumentParser(prog="dina", description="DiNa-LRM: a diffusion-native latent reward model")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_convert(subparsers)
    add_score_parser(subparsers)
    add_cache_parser(subparsers)
    add_train_parser(subparsers)
    add_eval_parser(subparsers)
    _add_demo(subparsers)
    add_align_parser(subparsers)
    add_serve_parser(subparsers)
    add_app_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
