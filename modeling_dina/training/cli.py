"""`dina train` and `dina cache`: subcommand builders and runners (wired into the `dina` entry point elsewhere).

`dina train --config FILE [--resume [CKPT]] [--overwrite-output-dir]` reads a YAML or JSON file with three sections (see
`hub_configs/train_example.yaml`):

- `model`: `base` (pipeline folder or Hub id) and `config` (`DiNaConfig` overrides) for a fresh model, or
  `pretrained` (a DiNa folder or repo) to fine-tune, optionally with `base` pointing at a local copy of its base;
  `dtype` (e.g. `bfloat16`) for the frozen weights.
- `data`: `train` and optional `eval`, each either `{cached: DIR}` (a `dina cache` output) or
  `{source, format, split, image_root, include_ties}` (a `modeling_dina.data` adapter; ranked groups become pairs),
  cached on first use under `cache.dir` (default `<output_dir>/_cache/<train|eval>`, which a Hub push leaves out)
  with the options of `cache` (`batch_size`, `resolution`, `max_sequence_length`, `shard_size`, `storage_dtype`).
- `training`: `DiNaTrainingArguments` keyword arguments (`output_dir` is required).

Run it under `torchrun --nproc_per_node N` for DDP: the main process caches first, the others then read its cache.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import yaml
from transformers.trainer_utils import enable_full_determinism, set_seed

from ..data import groups_to_pairs, load_preference_data
from ..modeling_dina import DiNaRewardModel
from ..safe_files import full_disk_explained
from .arguments import DiNaTrainingArguments
from .caching import BUCKET_POLICIES, SKIPPED_ROWS_NAME, cache_preference_dataset, load_cached_preferences
from .checkpoints import claim_output_dir, latest_complete_checkpoint
from .released_data import import_released_data
from .trainer import DiNaTrainer

_SECTIONS = {"model", "data", "training"}
_MODEL_KEYS = {"base", "pretrained", "config", "dtype"}
_SPLIT_KEYS = {"cached", "source", "format", "split", "image_root", "include_ties"}
_CACHE_KEYS = {"dir", "batch_size", "resolution", "max_sequence_length", "shard_size", "storage_dtype"}


def load_config(path: str | os.PathLike) -> dict:
    """A training config from a `.json` file or a YAML file, with its sections checked."""
    with open(path) as f:
        config = json.load(f) if str(path).endswith(".json") else yaml.safe_load(f)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping with sections {sorted(_SECTIONS)}")
    _check_keys(config, _SECTIONS, str(path))
    for section in ("model", "data", "training"):
        if not isinstance(config.get(section), dict):
            raise ValueError(f"{path}: the `{section}` section is missing or not a mapping")
    _check_keys(config["model"], _MODEL_KEYS, "model")
    _check_keys(config["data"], {"train", "eval", "cache"}, "data")
    for split in ("train", "eval"):
        if split in config["data"]:
            _check_keys(config["data"][split], _SPLIT_KEYS, f"data.{split}")
    _check_keys(config["data"].get("cache", {}), _CACHE_KEYS, "data.cache")
    if "train" not in config["data"]:
        raise ValueError(f"{path}: `data.train` is required")
    return config


def build_model(section: dict) -> DiNaRewardModel:
    """A fresh model on `base` with `config` overrides, or `pretrained` to fine-tune (its base relocated by `base`)."""
    dtype = getattr(torch, section["dtype"]) if "dtype" in section else None
    if "pretrained" in section:
        if "config" in section:
            raise ValueError("model: `config` overrides need a fresh model (`base`), not `pretrained`")
        return DiNaRewardModel.from_pretrained(section["pretrained"], base_model=section.get("base"), dtype=dtype)
    if "base" not in section:
        raise ValueError("model: give `base` (a fresh model) or `pretrained` (a DiNa folder to fine-tune)")
    return DiNaRewardModel.from_base(section["base"], dtype=dtype, **section.get("config", {}))


def load_split(section: dict, name: str, model: DiNaRewardModel, data: dict, args: DiNaTrainingArguments):
    """A `CachedPreferenceDataset` for one split, caching a raw source first (main process first under DDP)."""
    if "cached" in section:
        return load_cached_preferences(section["cached"])
    if "source" not in section or "format" not in section:
        raise ValueError(f"data.{name}: give `cached` or both `source` and `format`")
    options = dict(data.get("cache", {}))
    cache_dir = os.path.join(options.pop("dir", os.path.join(args.output_dir, "_cache")), name)
    options.setdefault("max_sequence_length", model.config.max_sequence_length)
    with args.main_process_first(desc=f"caching data.{name}"):
        dataset = load_preference_data(
            section["source"],
            format=section["format"],
            split=section.get("split"),
            image_root=section.get("image_root"),
            missing_images="keep",  # the cache skips and reports their rows
        )
        if "images" in dataset.column_names:
            dataset = groups_to_pairs(dataset, include_ties=section.get("include_ties", False))
        base = model.config.base_model_name_or_path
        return cache_preference_dataset(dataset, base, cache_dir, progress=args.local_process_index == 0, **options)


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train",
        help="train a DiNa-LRM with the HF Trainer from a YAML/JSON config",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="YAML or JSON file with model, data and training sections")
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CKPT",
        help="resume from CKPT, or from the newest complete checkpoint in output_dir when no path is given",
    )
    parser.add_argument(
        "--overwrite-output-dir",
        action="store_true",
        help="train into an output_dir that holds an earlier run (refused otherwise, unless --resume)",
    )
    parser.set_defaults(func=run_train)
    return parser


def run_train(args: argparse.Namespace) -> None:
    """Train, then save the model (EMA weights when on) and its card in `output_dir`, or push it when the training
    arguments say `push_to_hub`. The output folder is locked for the run; `--resume` without a path continues from
    the newest complete checkpoint."""
    config = load_config(args.config)
    training_args = DiNaTrainingArguments(**config["training"])
    output_dir = training_args.output_dir
    resume, overwrite = args.resume, getattr(args, "overwrite_output_dir", False)
    with claim_output_dir(training_args, resume=bool(resume), overwrite=overwrite):
        # The LoRA and the head are drawn from the global RNG when built: seed it first, as the Trainer later does.
        if training_args.full_determinism:
            enable_full_determinism(training_args.seed)
        else:
            set_seed(training_args.seed)
        model = build_model(config["model"])
        data = config["data"]
        splits = {
            name: load_split(data[name], name, model, data, training_args) for name in ("train", "eval") if name in data
        }
        trainer = DiNaTrainer(model, training_args, train_dataset=splits["train"], eval_dataset=splits.get("eval"))
        if resume is True:
            resume = latest_complete_checkpoint(output_dir)
        card = {n: data.get(split, {}).get("source") for n, split in (("dataset", "train"), ("eval_dataset", "eval"))}
        with full_disk_explained(output_dir, "free space, then rerun with --resume (it skips incomplete checkpoints)"):
            trainer.train(resume_from_checkpoint=resume)
            if training_args.push_to_hub:
                trainer.push_to_hub(**card)
            else:
                trainer.save_model()
                trainer.create_model_card(**card)
        trainer.end()


def add_cache_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "cache",
        help="encode a preference dataset once (VAE latents, prompt embeddings) for training",
        description="Cache preference pairs as VAE latents and prompt embeddings (resumable; reruns skip done shards).",
    )
    parser.add_argument("source", help="Hub id, local file or folder, as for `modeling_dina.data` adapters")
    parser.add_argument(
        "--format",
        required=True,
        help="adapter name, e.g. pickapic, hpdv3, pairs, groups; or `released` for the DiNa-LRM authors' "
        "preprocessed parquet latents (source: a file, folder or glob; their latents are kept, prompts encoded)",
    )
    parser.add_argument("--base", required=True, help="base pipeline folder or Hub id (its VAE and text encoders)")
    parser.add_argument("--output", required=True, help="cache folder")
    parser.add_argument("--split", default=None)
    parser.add_argument("--image-root", default=None, help="folder relative image paths resolve against")
    parser.add_argument("--include-ties", action="store_true", help="keep tied pairs of ranked groups (label 0.5)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-sequence-length", type=int, default=128, help="T5 tokens (the release used 128)")
    parser.add_argument("--resolution", type=int, default=None, help="bucket area side in pixels (default: native)")
    parser.add_argument(
        "--bucket-policy",
        choices=BUCKET_POLICIES,
        default="dense",
        help="dense: buckets of about --resolution² pixels, centre-cropped; released: the authors' 13 fixed buckets "
        "(256², 512², 1024² areas), pairs below 256² dropped, LANCZOS stretch",
    )
    parser.add_argument(
        "--sample-posterior", action="store_true", help="store VAE posterior samples (as the release trained on)"
    )
    parser.add_argument("--shard-size", type=int, default=1000, help="pairs per resumable shard")
    parser.add_argument("--storage-dtype", choices=("float32", "float16"), default="float32")
    parser.add_argument("--device", default=None, help="device of the encoders, e.g. cuda")
    parser.add_argument("--index", default=None, help="with --format released: their bucket_index.csv of rows to use")
    parser.set_defaults(func=run_cache)
    return parser


def run_cache(args: argparse.Namespace) -> None:
    options = dict(batch_size=args.batch_size, max_sequence_length=args.max_sequence_length, device=args.device)
    options.update(shard_size=args.shard_size, storage_dtype=args.storage_dtype)
    if args.format == "released":
        cached = import_released_data(args.source, args.base, args.output, index=args.index, **options)
        print(f"imported {len(cached)} pairs into {args.output}")
        return
    if args.index is not None:
        raise SystemExit("--index is for --format released (the authors' bucket_index.csv)")
    dataset = load_preference_data(
        args.source, format=args.format, split=args.split, image_root=args.image_root, missing_images="keep"
    )
    if "images" in dataset.column_names:
        dataset = groups_to_pairs(dataset, include_ties=args.include_ties)
    options.update(bucket_policy=args.bucket_policy, sample_posterior=args.sample_posterior)
    cached = cache_preference_dataset(dataset, args.base, args.output, resolution=args.resolution, **options)
    skipped = len(dataset) - len(cached)
    note = f"; {skipped} skipped, listed in {os.path.join(args.output, SKIPPED_ROWS_NAME)}" if skipped else ""
    print(f"cached {len(cached)} of {len(dataset)} pairs in {args.output}{note}")


def _check_keys(section: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


__all__ = ["add_cache_parser", "add_train_parser", "build_model", "load_config", "run_cache", "run_train"]
