"""Shapes preference pairs written the way a user brings their own: PNG files and one JSONL file per split.

    python -m modeling_dina.shapes.export_pairs DIR --num 2000 --test 500

writes `DIR/images/<split>/NNNNN_{chosen,rejected}.png` and `DIR/{train,test}.jsonl`, one line per pair:
`{"prompt", "chosen", "rejected", "label"}` with image paths relative to `DIR` (the `pairs` format of
`modeling_dina.data`: `dina cache DIR/train.jsonl --format pairs ...`). Train and test pairs come from disjoint
prompts. Each JSONL file is written last, through a temporary file, so a listed image always exists.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from tqdm.auto import tqdm

from .data import build_preference_dataset


def export_pairs(output_dir: str | os.PathLike, num_train: int, num_test: int = 0, *, seed: int = 0) -> dict:
    """Render `num_train` train-split and `num_test` test-split pairs into `output_dir`; returns the JSONL paths."""
    if num_train < 1 or num_test < 0:
        raise ValueError(f"need num_train >= 1 and num_test >= 0, got {num_train} and {num_test}")
    out = Path(output_dir)
    sizes = {"train": num_train, "test": num_test} if num_test else {"train": num_train}
    paths = {}
    for split, pairs in build_preference_dataset(sizes, seed=seed).items():
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        lines = []
        for index, row in enumerate(tqdm(pairs, desc=f"writing {split} pairs", unit="pair")):
            names = {side: f"images/{split}/{index:05d}_{side}.png" for side in ("chosen", "rejected")}
            for side, name in names.items():
                row[side].save(out / name)
            lines.append(json.dumps({"prompt": row["prompt"], **names, "label": row["label"]}) + "\n")
        paths[split] = out / f"{split}.jsonl"
        tmp = paths[split].with_suffix(".jsonl.tmp")
        tmp.write_text("".join(lines))
        os.replace(tmp, paths[split])
    return paths


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="folder for images/ and the JSONL files")
    parser.add_argument("--num", type=int, default=2000, help="train pairs")
    parser.add_argument("--test", type=int, default=500, help="test pairs, over prompts the train pairs never use")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = export_pairs(args.output, args.num, args.test, seed=args.seed)
    for split, path in paths.items():
        print(f"{split}: {path}")
    return paths


if __name__ == "__main__":
    main()
