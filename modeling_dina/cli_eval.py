"""`dina eval`: DiNa-LRM (per noise level and as an ensemble) and baseline rewards on a preference benchmark."""

from __future__ import annotations

import argparse

from .data import BENCHMARKS, FORMATS, load_benchmark, load_preference_data

EVAL_HELP = "accuracy of DiNa-LRM (per noise level, ensemble) and baselines on a benchmark, with bootstrap CIs"


def _levels(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated noise levels, got {text!r}") from err


def add_eval_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help=EVAL_HELP, description=EVAL_HELP)
    p.add_argument("--model", required=True, help="a DiNa model folder or Hub id")
    p.add_argument(
        "--benchmark",
        required=True,
        help=f"a known benchmark ({', '.join(sorted(BENCHMARKS))}) or a data format ({', '.join(sorted(FORMATS))}) "
        "with --path",
    )
    p.add_argument("--path", help="a local copy of the benchmark (folder, parquet/JSON/JSONL file)")
    p.add_argument("--image-root", help="folder the benchmark's relative image paths start from")
    p.add_argument("--split", help="dataset split (default: the benchmark's test split)")
    p.add_argument("--noise-levels", type=_levels, default=None, help="e.g. 0.2,0.5,0.7 (default: the config's)")
    p.add_argument("--ensemble", action="store_true", help="also score the noise levels as one ensemble")
    p.add_argument(
        "--noise",
        choices=("shared", "independent", "both"),
        default="shared",
        help="shared: the images of a prompt see one noise draw (common random numbers); independent: a fresh draw "
        "per image, seeded, as the paper's evaluation does (scorers named dina-independent@...); both: side by side",
    )
    p.add_argument("--noise-seed", type=int, default=0, help="seed of the independent draws")
    p.add_argument("--clip", action="append", default=[], metavar="MODEL", help="a CLIP-score baseline (repeatable)")
    p.add_argument("--pickscore", metavar="MODEL", help="a PickScore-style CLIP baseline")
    p.add_argument("--pickscore-processor", default="laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    p.add_argument("--limit", type=int, help="only the first N items (a quick look)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    p.add_argument("--tie-policy", choices=("exclude", "half"), default="exclude")
    p.add_argument("--output", default="outputs/eval", help="folder for results.json/.md, the plot and the cache")
    p.add_argument("--device", help="e.g. cuda (default: the model's)")
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> dict:
    from .baselines import CLIPScorer
    from .evaluation import run_benchmark
    from .pipeline_dina import DiNaRewardPipeline
    from .rewards import DiNaScorer

    if args.benchmark in BENCHMARKS:
        dataset = load_benchmark(args.benchmark, path=args.path, split=args.split, image_root=args.image_root)
    elif args.benchmark in FORMATS and args.path:
        dataset = load_preference_data(args.path, format=args.benchmark, split=args.split, image_root=args.image_root)
    else:
        raise SystemExit(f"--benchmark {args.benchmark!r}: not a known benchmark, or a format given without --path.")
    if args.limit:
        dataset = dataset.select(range(min(args.limit, len(dataset))))

    pipe = DiNaRewardPipeline.from_pretrained(args.model)
    if args.device:
        pipe = pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    levels = args.noise_levels or list(pipe.reward_model.config.ensemble_noise_levels)
    settings = [{"noise_level": u} for u in levels] + ([{"noise_levels": levels}] if args.ensemble else [])
    modes = ("shared", "independent") if args.noise == "both" else (args.noise,)
    scorers = {}
    for mode in modes:
        for setting in settings:
            scorer = DiNaScorer(pipe, **setting, batch_size=args.batch_size, noise=mode, seed=args.noise_seed)
            scorers[scorer.name] = scorer
    for model in args.clip:
        scorers[f"clip:{model}"] = CLIPScorer.from_pretrained(model, mode="clip", device=args.device)
    if args.pickscore:
        scorers["pickscore"] = CLIPScorer.from_pretrained(
            args.pickscore, processor=args.pickscore_processor, mode="pickscore", device=args.device
        )
    results = run_benchmark(
        scorers,
        dataset,
        output_dir=args.output,
        batch_size=args.batch_size,
        n_bootstrap=args.bootstrap,
        tie_policy=args.tie_policy,
    )
    with open(f"{args.output}/results.md") as f:
        print(f.read())
    return results
