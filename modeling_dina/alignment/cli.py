"""`dina align --config FILE [--resume]`: wire with `add_align_parser(subparsers)` in the `dina` command."""

from __future__ import annotations

import argparse


def add_align_parser(subparsers) -> argparse.ArgumentParser:
    """Register the `align` subcommand (its handler is `run_align`)."""
    p = subparsers.add_parser(
        "align",
        help="fine-tune a generator's LoRA against a latent reward (ReFL or GRPO)",
        description="Fine-tune a generator's LoRA against a latent reward (ReFL or GRPO). A config is code: its "
        "`pixel_reward` and `eval_fn` entries name `module:function`, which is imported and run; only use configs "
        "you wrote or trust.",
    )
    p.add_argument(
        "--config",
        required=True,
        help="YAML or JSON file of AlignmentConfig fields: pipeline, reward (DiNa folder or 'pixel' with "
        "pixel_reward 'module:function'), prompts (list or file), method (refl|grpo|raft), steps, ... "
        "(`pixel_reward` and `eval_fn` import and run the code they name: trusted configs only)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    p.set_defaults(func=run_align)
    return p


def run_align(args: argparse.Namespace) -> None:
    from .config import AlignmentConfig
    from .loop import run_alignment

    config = AlignmentConfig.from_file(args.config)
    records = run_alignment(config, resume=args.resume)
    last = next((r for r in reversed(records) if "reward_mean" in r), None)
    summary = f" (last reward mean {last['reward_mean']:.4g})" if last else ""
    print(f"aligned LoRA in {config.output_dir}/lora{summary}")
