"""`dina score` (a few image files, printed as a table or JSON) and `dina score-dataset` (a `datasets` dataset, scored
into new columns, sharded across processes under `accelerate launch` / `torchrun`).

Wire into the `dina` entry point with `add_score_parser(subparsers)`; each sub-command sets `args.func`.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import shutil
from contextlib import ExitStack, contextmanager

import torch

from .safe_files import exclusive_lock, full_disk_explained, write_json_atomic

JOB_NAME = "job.json"

SCORE_HELP = "score image files against a prompt"
DATASET_HELP = "score a datasets dataset (local folder, saved dataset or Hub id) into new columns"


def add_score_parser(subparsers) -> None:
    """Add the `score` and `score-dataset` sub-commands to an argparse `subparsers` object."""
    score = subparsers.add_parser("score", help=SCORE_HELP, description=SCORE_HELP)
    _add_model_arguments(score)
    score.add_argument("--prompt", required=True, help="the prompt all images are scored against")
    score.add_argument("images", nargs="+", help="image files")
    score.add_argument("--json", action="store_true", help="print JSON instead of a table")
    score.set_defaults(func=run_score)

    dataset = subparsers.add_parser("score-dataset", help=DATASET_HELP, description=DATASET_HELP)
    _add_model_arguments(dataset)
    dataset.add_argument("--dataset", required=True, help="a saved dataset folder, a data folder/file, or a Hub id")
    dataset.add_argument("--split", default=None, help="split to score (required when there are several)")
    dataset.add_argument("--image-column", default="image")
    dataset.add_argument("--prompt-column", default="prompt")
    dataset.add_argument("--reward-column", default="dina_reward", help="new column for the raw reward")
    dataset.add_argument("--score-column", default="dina_score", help="new column for the normalised score")
    dataset.add_argument(
        "--output", required=True, help="where to write: a folder (save_to_disk) or a .parquet/.jsonl/.csv file"
    )
    dataset.add_argument(
        "--shard-size", type=int, default=512, help="rows per shard (the unit written as it goes and resumed)"
    )
    dataset.set_defaults(func=run_score_dataset)


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a DiNa model or saved reward pipeline (folder or Hub id)")
    parser.add_argument("--base-model", default=None, help="read the base (text encoders, VAE) from here instead")
    level = parser.add_mutually_exclusive_group()
    level.add_argument("--noise-level", type=float, default=None, help="noise level in [0, 1] (default: config's)")
    level.add_argument("--noise-levels", type=_float_list, default=None, help="noise ensemble, e.g. 0.2,0.5,0.7")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")


def _float_list(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err


def _load_pipeline(args, device):
    from .pipeline_dina import DiNaRewardPipeline

    pipe = DiNaRewardPipeline.from_pretrained(args.model, base_model=args.base_model, dtype=getattr(torch, args.dtype))
    return pipe.to(device)


def run_score(args) -> None:
    """`dina score`: print a table (or JSON with `--json`) of the rewards and normalised scores."""
    from accelerate import PartialState

    missing = [path for path in args.images if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(f"`images`: no such file(s) {missing}.")
    pipe = _load_pipeline(args, PartialState().device)
    out = pipe(
        args.prompt,
        images=list(args.images),
        noise_level=args.noise_level,
        noise_levels=args.noise_levels,
        batch_size=args.batch_size,
    )
    result = {
        "model": args.model,
        "prompt": args.prompt,
        "sigmas": out.sigmas.tolist(),
        "results": [
            {"image": path, "reward": reward, "score": score}
            for path, reward, score in zip(args.images, out.rewards.tolist(), out.scores.tolist())
        ],
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        sigmas = ", ".join(f"{s:.4f}" for s in result["sigmas"])
        print(f"prompt: {args.prompt!r}   sigma: {sigmas}\n\n| image | reward | score |\n|---|---:|---:|")
        for row in result["results"]:
            print(f"| {row['image']} | {row['reward']:.4f} | {row['score']:.4f} |")


def run_score_dataset(args) -> None:
    """`dina score-dataset` as a resumable job. Rows are scored in shards of `--shard-size` (shard `i` by process
    `i % world_size`), each written atomically to `<output>.parts/` as it is done; a rerun skips the shards already
    there. A row whose image or prompt cannot be read is skipped and listed with its dataset row in
    `<output>.skipped_rows.json`. Once every shard is in, the main process writes `--output` through a temporary
    file renamed into place (complete or absent) and removes the parts."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    # Without an accelerator, accelerate runs CPU processes launched by torchrun as one each unless told `cpu=True`.
    state = PartialState(cpu=not torch.accelerator.is_available())
    dataset = _load_dataset(args.dataset, args.split)
    for column in (args.image_column, args.prompt_column):
        if column not in dataset.column_names:
            raise ValueError(f"the dataset has no column {column!r}; columns: {dataset.column_names}.")
    for column in (args.reward_column, args.score_column):
        if column in dataset.column_names:
            raise ValueError(f"the dataset already has a column {column!r}: choose another name.")
    if args.shard_size < 1 or args.batch_size < 1:
        raise ValueError(f"`--shard-size` and `--batch-size` must be >= 1, got {args.shard_size}, {args.batch_size}.")
    output, parts = os.path.abspath(args.output), os.path.abspath(args.output) + ".parts"
    num_shards = max(1, -(-len(dataset) // args.shard_size))
    with _claim_job(state, output, parts, _job_settings(args, dataset)):
        todo = [i for i in range(state.process_index, num_shards, state.num_processes) if not _shard_done(parts, i)]
        if todo:
            pipe = _load_pipeline(args, state.device)
            pipe.set_progress_bar_config(disable=True)
            columns = dataset.select_columns([args.image_column, args.prompt_column])
            root = args.dataset if os.path.isdir(args.dataset) else None
            advice = "free space and rerun the same command: the shards already written are kept"
            with full_disk_explained(parts, advice):
                for shard in tqdm(todo, disable=not state.is_local_main_process, desc="scoring shards"):
                    rows = range(shard * args.shard_size, min(len(dataset), (shard + 1) * args.shard_size))
                    write_json_atomic(_shard_path(parts, shard), _score_rows(pipe, columns, rows, root, args))
        state.wait_for_everyone()
        if state.is_main_process:
            with full_disk_explained(output, "free space and rerun the same command: every shard is kept"):
                _write_output(dataset, parts, num_shards, output, args)
    state.wait_for_everyone()


def _job_settings(args, dataset) -> dict:
    """What a shard depends on: a rerun with other settings would mix results, so it is refused."""
    names = ("model", "base_model", "split", "image_column", "prompt_column", "noise_level", "noise_levels")
    return {
        **{name: getattr(args, name) for name in names},
        "dataset": os.path.abspath(args.dataset) if os.path.exists(args.dataset) else args.dataset,
        "num_rows": len(dataset),
        "fingerprint": getattr(dataset, "_fingerprint", None),
        "batch_size": args.batch_size,
        "shard_size": args.shard_size,
        "dtype": args.dtype,
    }


@contextmanager
def _claim_job(state, output: str, parts: str, settings: dict):
    """On the main process: refuse an existing output, check the output's folder is writable before anything is
    scored (by creating the parts folder there), lock it for this job and check an earlier run's settings."""
    if not state.is_main_process:
        state.wait_for_everyone()
        yield
        return
    if os.path.exists(output):
        raise FileExistsError(f"`--output` {output!r} already exists: remove it or choose another path.")
    with ExitStack() as stack:
        try:
            os.makedirs(parts, exist_ok=True)
            stack.enter_context(exclusive_lock(parts, "a `dina score-dataset` job"))
        except PermissionError as err:
            raise PermissionError(f"cannot write next to `--output` {output!r} ({err}); nothing was scored.") from err
        info = _read_json(os.path.join(parts, JOB_NAME))
        if info is not None and info != settings:
            changed = sorted(k for k in settings if info.get(k) != settings[k])
            raise ValueError(
                f"{parts!r} holds an unfinished job with other settings ({', '.join(changed)} differ): rerun it with "
                "those settings, or delete the folder to start over."
            )
        write_json_atomic(os.path.join(parts, JOB_NAME), settings)
        state.wait_for_everyone()
        yield


def _score_rows(pipe, columns, rows: range, root: str | None, args) -> dict:
    """Rewards and scores of `rows`, `--batch-size` at a time; a row whose image or prompt cannot be read, or that
    fails alone in the pipeline, is listed as skipped with its dataset row and the error."""
    result = {"rows": [], "rewards": [], "scores": [], "skipped": []}
    for start in range(rows.start, rows.stop, args.batch_size):
        batch = columns[start : min(rows.stop, start + args.batch_size)]
        items = []
        for row, cell, prompt in zip(range(start, rows.stop), batch[args.image_column], batch[args.prompt_column]):
            try:
                items.append((row, _open_image(cell, root, f"{args.image_column}[{row}]"), _prompt(prompt, row, args)))
            except Exception as err:  # any unreadable row: report it with its dataset row, never drop it silently
                result["skipped"].append({"row": row, "error": f"{type(err).__name__}: {err}"})
        if items:
            _score_items(pipe, items, args, result)
    result["skipped"].sort(key=lambda entry: entry["row"])
    return result


def _score_items(pipe, items: list, args, result: dict) -> None:
    """Score `(row, image, prompt)` items in one pipeline call; when it fails, row by row, so only the rows that fail
    alone are skipped (when every row of the batch fails alone, the fault is not in the rows: it is raised)."""
    try:
        out = pipe(
            [prompt for _, _, prompt in items],
            images=[image for _, image, _ in items],
            noise_level=args.noise_level,
            noise_levels=args.noise_levels,
            batch_size=args.batch_size,
        )
    except Exception as err:
        if len(items) == 1:
            result["skipped"].append({"row": items[0][0], "error": f"{type(err).__name__}: {err}"})
            return
        skipped = len(result["skipped"])
        for item in items:
            _score_items(pipe, [item], args, result)
        if len(result["skipped"]) - skipped == len(items):
            raise
        return
    result["rows"] += [row for row, _, _ in items]
    result["rewards"] += out.rewards.tolist()
    result["scores"] += out.scores.tolist()


def _open_image(cell, root: str | None, where: str):
    """A dataset image cell decoded fully (so a broken file fails here, on its row): a PIL image."""
    import PIL.Image

    source = _image_cell(cell, root, where)
    if isinstance(source, str):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"`{where}`: no such file {source!r}")
        source = PIL.Image.open(source)
    if isinstance(source, PIL.Image.Image):
        source.load()
    return source


def _prompt(prompt, row: int, args) -> str:
    if not isinstance(prompt, str):
        raise TypeError(f"`{args.prompt_column}[{row}]` is {prompt!r}, not a string")
    return prompt


def _write_output(dataset, parts: str, num_shards: int, output: str, args) -> None:
    """Gather the shards in row order, write `--output` and the skipped rows atomically, then remove the parts."""
    missing = [i for i in range(num_shards) if not _shard_done(parts, i)]
    if missing:
        raise RuntimeError(f"shards {missing[:5]} of {parts!r} are missing: rerun the same command to finish them.")
    shards = [_read_json(_shard_path(parts, i)) for i in range(num_shards)]
    rows = [row for shard in shards for row in shard["rows"]]
    skipped = [entry for shard in shards for entry in shard["skipped"]]
    scored = dataset.select(rows)
    scored = scored.add_column(args.reward_column, [r for shard in shards for r in shard["rewards"]])
    scored = scored.add_column(args.score_column, [s for shard in shards for s in shard["scores"]])
    folder, name = os.path.split(output)
    for stale in glob.glob(os.path.join(glob.escape(folder), f".tmp-*-{glob.escape(name)}")):  # a killed write
        if os.path.isdir(stale):
            shutil.rmtree(stale)
        else:
            os.remove(stale)
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{name}")
    _save_dataset(scored, tmp)
    write_json_atomic(f"{output}.skipped_rows.json", skipped)
    os.replace(tmp, output)
    shutil.rmtree(parts)
    note = f"; {len(skipped)} skipped (unreadable), listed in {output}.skipped_rows.json" if skipped else ""
    print(f"scored {len(rows)} of {len(dataset)} rows into {output}{note}")


def _shard_path(parts: str, shard: int) -> str:
    return os.path.join(parts, f"shard-{shard:05d}.json")


def _shard_done(parts: str, shard: int) -> bool:
    return os.path.isfile(_shard_path(parts, shard))


def _read_json(path: str):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _load_dataset(source: str, split: str | None):
    import datasets

    saved = ("dataset_info.json", "dataset_dict.json")  # what `save_to_disk` writes
    if os.path.isdir(source) and any(os.path.isfile(os.path.join(source, name)) for name in saved):
        loaded = datasets.load_from_disk(source)
    elif os.path.isfile(source):
        extension = os.path.splitext(source)[1].lstrip(".").replace("jsonl", "json")
        loaded = datasets.load_dataset(extension, data_files=source)
    else:
        loaded = datasets.load_dataset(source)
    if isinstance(loaded, datasets.DatasetDict):
        if split is None and len(loaded) == 1:
            split = next(iter(loaded))
        if split not in loaded:
            raise ValueError(f"`--split` must be one of {sorted(loaded)} for {source!r}, got {split!r}.")
        loaded = loaded[split]
    elif split is not None and split != str(loaded.split):
        raise ValueError(f"`--split` {split!r} given, but {source!r} is a single dataset of split {loaded.split}.")
    return loaded


def _image_cell(cell, root: str | None, where: str):
    """A dataset image cell as something the pipeline takes: a PIL image, or a path (relative ones from `root`)."""
    import PIL.Image

    if isinstance(cell, dict):  # an undecoded `Image` feature
        if cell.get("bytes"):
            return PIL.Image.open(io.BytesIO(cell["bytes"]))
        cell = cell.get("path")
    if isinstance(cell, str) and root is not None and not os.path.isabs(cell):
        return os.path.join(root, cell)
    if cell is None:
        raise ValueError(f"`{where}` holds no image.")
    return cell


def _save_dataset(dataset, output: str) -> None:
    extension = os.path.splitext(output)[1].lower()
    if extension == ".parquet":
        dataset.to_parquet(output)
    elif extension in (".jsonl", ".json"):
        dataset.to_json(output)
    elif extension == ".csv":
        dataset.to_csv(output)
    else:
        dataset.save_to_disk(output)


__all__ = ["add_score_parser", "run_score", "run_score_dataset"]
