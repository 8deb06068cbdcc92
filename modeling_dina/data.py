"""Preference data: two internal schemas (pairs, ranked groups) and adapters from public datasets.

Every adapter returns a `datasets.Dataset` in one of the schemas and takes the same source forms: a Hub id
(loaded with `datasets.load_dataset`), a local file (parquet, JSON, JSONL), a local folder (a `save_to_disk`
copy, or data files named after their split such as `test.json` or `data/test-00000-of-00001.parquet`), or an
already loaded `Dataset`/`DatasetDict`. Relative image paths resolve against `image_root`, by default the
folder of a local source (else the working directory). Images stay lazy: paths are stored and checked to exist,
not read, until a row is decoded.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.compute as pc
from datasets import (
    Dataset,
    DatasetDict,
    Features,
    Image,
    List,
    Value,
)

from .data_reading import (
    LOADING,
    check_schema,
    convert_rows,
    first_present,
    image_cell,
    is_unit,
    load_source,
    ranks_from_scores,
    require_columns,
    undecoded,
)

PAIR_FEATURES = Features({"prompt": Value("string"), "chosen": Image(), "rejected": Image(), "label": Value("float32")})
"""Preference pairs. `label` is P(chosen preferred): 1.0 a clear preference, 0.5 a tie, soft values allowed."""

GROUP_FEATURES = Features({"prompt": Value("string"), "images": List(Image()), "ranks": List(Value("int32"))})
"""Ranked groups: several images for one prompt; a lower rank is better, equal ranks are ties."""

TIE_LABEL = 0.5

_GENAI_VOTES = {"leftvote": (0, 1.0), "rightvote": (1, 1.0), "tievote": (0, TIE_LABEL), "bothbad_vote": (0, TIE_LABEL)}


# ----------------------------------------------------------------------------------------------------------
# Schemas
# ----------------------------------------------------------------------------------------------------------
def validate_pairs(pairs: Dataset) -> Dataset:
    """Check `pairs` against the pair schema; return it with `PAIR_FEATURES` types. Extra columns are kept."""
    pairs = check_schema(pairs, PAIR_FEATURES, "pairs")
    labels = np.asarray(pairs.with_format("numpy")["label"], dtype=np.float64)
    bad = np.flatnonzero(~((labels >= 0.0) & (labels <= 1.0)))
    if bad.size:
        raise ValueError(
            f"pairs: label must be in [0, 1], row {bad[0]} has {labels[bad[0]]} ({bad.size} such rows in all)"
        )
    return pairs


def validate_groups(groups: Dataset) -> Dataset:
    """Check `groups` against the ranked-group schema; return it with `GROUP_FEATURES` types."""
    groups = check_schema(groups, GROUP_FEATURES, "groups")
    offset = 0
    for batch in groups.select_columns(["images", "ranks"]).with_format("arrow").iter(batch_size=10_000):
        n_images = pc.list_value_length(batch["images"]).to_numpy(zero_copy_only=False)
        n_ranks = pc.list_value_length(batch["ranks"]).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero((n_images != n_ranks) | (n_images == 0))
        if bad.size:
            i = bad[0]
            raise ValueError(
                f"groups: row {offset + i} has {n_images[i]} images and {n_ranks[i]} ranks (need as many, >= 1)"
            )
        offset += len(n_images)
    return groups


def groups_to_pairs(groups: Dataset, *, include_ties: bool = False) -> Dataset:
    """Expand ranked groups into all their pairs, the better-ranked image as `chosen`.

    Tied pairs become label-0.5 pairs when `include_ties`, else they are dropped. Each pair keeps its group's
    extra columns and gets `group_index`, the row of its group in `groups`.
    """
    groups = undecoded(validate_groups(groups), ["images"])
    extra = [name for name in groups.column_names if name not in GROUP_FEATURES]
    features = Features({**PAIR_FEATURES, "group_index": Value("int64"), **{c: groups.features[c] for c in extra}})

    def expand(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {name: [] for name in features}
        for k, (images, ranks) in enumerate(zip(batch["images"], batch["ranks"])):
            for i, j in itertools.combinations(range(len(ranks)), 2):
                if ranks[i] == ranks[j] and not include_ties:
                    continue
                win, lose = (j, i) if ranks[j] < ranks[i] else (i, j)
                out["prompt"].append(batch["prompt"][k])
                out["chosen"].append(images[win])
                out["rejected"].append(images[lose])
                out["label"].append(TIE_LABEL if ranks[i] == ranks[j] else 1.0)
                out["group_index"].append(indices[k])
                for name in extra:
                    out[name].append(batch[name][k])
        return out

    pairs = groups.map(expand, batched=True, with_indices=True, remove_columns=groups.column_names, features=features)
    if len(pairs) == 0:
        hint = "" if include_ties else " (tied pairs were dropped: pass include_ties=True to keep them)"
        raise ValueError(f"groups_to_pairs: no group has two images with distinct ranks{hint}")
    return pairs


# ----------------------------------------------------------------------------------------------------------
# Adapters
# ----------------------------------------------------------------------------------------------------------
def load_pickapic(
    source: str | os.PathLike | Dataset | DatasetDict,
    *,
    split: str | None = None,
    image_root: str | os.PathLike | None = None,
    **load_kwargs: Any,
) -> Dataset:
    """Pick-a-Pic v2 (`caption`, `jpg_0`, `jpg_1`, `label_0`, `label_1`) -> pairs; the preferred image is chosen.

    `label` is the chosen image's label: 1.0, or 0.5 for a tie (0.5/0.5). Other columns are kept as they are,
    so their `_0`/`_1` suffixes still refer to the source order.
    """
    ds, root = load_source(source, split, load_kwargs)
    consumed = ["caption", "jpg_0", "jpg_1", "label_0", "label_1"]
    ds = undecoded(require_columns(ds, consumed, "Pick-a-Pic"), ["jpg_0", "jpg_1"])
    root = image_root or root

    def convert(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {"prompt": batch["caption"], "chosen": [], "rejected": [], "label": []}
        for row, jpg_0, jpg_1, label_0, label_1 in zip(
            indices, batch["jpg_0"], batch["jpg_1"], batch["label_0"], batch["label_1"]
        ):
            if not is_unit(label_0) or not is_unit(label_1) or abs(label_0 + label_1 - 1.0) > 1e-6:
                raise ValueError(
                    f"Pick-a-Pic row {row}: label_0={label_0}, label_1={label_1}; need values in [0, 1] summing to 1"
                )
            first_wins = label_0 >= label_1
            out["chosen"].append(image_cell(jpg_0 if first_wins else jpg_1, root, row, "Pick-a-Pic"))
            out["rejected"].append(image_cell(jpg_1 if first_wins else jpg_0, root, row, "Pick-a-Pic"))
            out["label"].append(max(label_0, label_1))
        return out

    return validate_pairs(convert_rows(ds, convert, consumed, PAIR_FEATURES))


def load_hpdv3(
    source: str | os.PathLike | Dataset | DatasetDict,
    *,
    split: str | None = None,
    image_root: str | os.PathLike | None = None,
    **load_kwargs: Any,
) -> Dataset:
    """HPDv3 pair records (`prompt`, `path1` preferred, `path2`; paths relative to `image_root`) -> pairs."""
    ds, root = load_source(source, split, load_kwargs)
    consumed = ["path1", "path2"]
    ds = require_columns(ds, ["prompt", *consumed], "HPDv3")
    root = image_root or root

    def convert(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        return {
            "chosen": [image_cell(p, root, row, "HPDv3 path1") for row, p in zip(indices, batch["path1"])],
            "rejected": [image_cell(p, root, row, "HPDv3 path2") for row, p in zip(indices, batch["path2"])],
            "label": [1.0] * len(indices),
        }

    return validate_pairs(convert_rows(ds, convert, consumed, PAIR_FEATURES))


def load_hpdv2(
    source: str | os.PathLike | Dataset | DatasetDict,
    *,
    split: str | None = None,
    image_root: str | os.PathLike | None = None,
    **load_kwargs: Any,
) -> Dataset:
    """HPDv2 -> ranked groups.

    Test rows: `prompt`, `image_path` (list), `rank` (list, lower is better). Train rows: `prompt`, `image_path`
    (two paths), `human_preference` (one score per image, higher is better). Embedded images in an `image`
    list column (the Hub layout) are used instead of `image_path` when present.
    """
    ds, root = load_source(source, split, load_kwargs)
    images_column = first_present(ds, ["image", "image_path"], "HPDv2")
    ranks_column = first_present(ds, ["rank", "human_preference"], "HPDv2")
    consumed = [c for c in ("image", "image_path", "rank", "human_preference") if c in ds.column_names]
    ds = require_columns(ds, ["prompt"], "HPDv2")
    to_ranks = ranks_from_scores if ranks_column == "human_preference" else list
    return validate_groups(
        _list_groups(ds, image_root or root, "HPDv2", images_column, ranks_column, to_ranks, consumed)
    )


def load_imagereward(
    source: str | os.PathLike | Dataset | DatasetDict,
    *,
    split: str | None = None,
    image_root: str | os.PathLike | None = None,
    **load_kwargs: Any,
) -> Dataset:
    """ImageReward data -> ranked groups.

    ImageRewardDB rows hold one image each (`prompt_id`, `prompt`, `rank`, and `image` or `image_path`) and are
    grouped by `prompt_id` in order of appearance; rows of ImageReward's `test.json` already hold a group
    (`prompt`, `generations` paths, `ranking`). Lower ranks are better in both.
    """
    ds, root = load_source(source, split, load_kwargs)
    root = image_root or root
    if "generations" in ds.column_names:
        ds = require_columns(ds, ["prompt", "ranking"], "ImageReward")
        groups = _list_groups(ds, root, "ImageReward", "generations", "ranking", list, ["generations", "ranking"])
        return validate_groups(groups)
    ds = require_columns(ds, ["prompt_id", "prompt", "rank"], "ImageRewardDB")
    image_column = first_present(ds, ["image", "image_path"], "ImageRewardDB")
    meta = ds.select_columns(["prompt_id", "prompt", "rank"]).to_dict()
    rows_of: dict[Any, list[int]] = {}
    for row, prompt_id in enumerate(meta["prompt_id"]):
        rows_of.setdefault(prompt_id, []).append(row)
    head = {"prompt": Value("string"), "prompt_id": ds.features["prompt_id"]}
    index = Dataset.from_dict(
        {
            "prompt": [meta["prompt"][rows[0]] for rows in rows_of.values()],
            "prompt_id": list(rows_of),
            "rows": list(rows_of.values()),
        },
        features=Features({**head, "rows": List(Value("int64"))}),
    )
    images = undecoded(ds.select_columns([image_column]), [image_column])

    def gather(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"images": [], "ranks": []}
        for rows in batch["rows"]:
            cells = zip(rows, images[rows][image_column])
            out["images"].append([image_cell(v, root, r, f"ImageRewardDB {image_column}") for r, v in cells])
            out["ranks"].append([meta["rank"][r] for r in rows])
        return out

    features = Features({**GROUP_FEATURES, **head})
    return validate_groups(index.map(gather, batched=True, remove_columns=["rows"], features=features))


def load_genai_bench(
    source: str | os.PathLike | Dataset | DatasetDict,
    *,
    split: str | None = None,
    image_root: str | os.PathLike | None = None,
    **load_kwargs: Any,
) -> Dataset:
    """GenAI-Bench votes (`prompt`, `left_image`, `right_image`, `vote_type`) -> pairs.

    `leftvote`/`rightvote` make that side `chosen` (label 1.0); `tievote` and `bothbad_vote` keep left as
    `chosen` with label 0.5. `vote_type` and the other columns are kept.
    """
    ds, root = load_source(source, split, load_kwargs)
    consumed = ["left_image", "right_image"]
    ds = undecoded(require_columns(ds, ["prompt", *consumed, "vote_type"], "GenAI-Bench"), consumed)
    root = image_root or root

    def convert(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {"chosen": [], "rejected": [], "label": []}
        for row, left, right, vote in zip(indices, batch["left_image"], batch["right_image"], batch["vote_type"]):
            if vote not in _GENAI_VOTES:
                raise ValueError(f"GenAI-Bench row {row}: vote_type {vote!r} is not one of {sorted(_GENAI_VOTES)}")
            winner, label = _GENAI_VOTES[vote]
            sides = (left, right) if winner == 0 else (right, left)
            out["chosen"].append(image_cell(sides[0], root, row, "GenAI-Bench"))
            out["rejected"].append(image_cell(sides[1], root, row, "GenAI-Bench"))
            out["label"].append(label)
        return out

    return validate_pairs(convert_rows(ds, convert, consumed, PAIR_FEATURES))


def load_pairs(
    source: str | os.PathLike | Dataset | DatasetDict,
    *,
    split: str | None = None,
    image_root: str | os.PathLike | None = None,
    **load_kwargs: Any,
) -> Dataset:
    """Plain pairs, e.g. JSONL lines `{"prompt", "chosen", "rejected", "label"?}` -> pairs.

    Images are paths (relative to the file's folder unless `image_root` is given), bytes or `Image` values; a
    missing `label` means 1.0 (chosen preferred). Extra fields such as `source_id` are kept.
    """
    ds, root = load_source(source, split, load_kwargs)
    consumed = ["chosen", "rejected", "label"] if "label" in ds.column_names else ["chosen", "rejected"]
    ds = undecoded(require_columns(ds, ["prompt", "chosen", "rejected"], "pairs"), ["chosen", "rejected"])
    root = image_root or root

    def convert(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        labels = batch["label"] if "label" in batch else [None] * len(indices)
        return {
            "chosen": [image_cell(v, root, row, "pairs chosen") for row, v in zip(indices, batch["chosen"])],
            "rejected": [image_cell(v, root, row, "pairs rejected") for row, v in zip(indices, batch["rejected"])],
            "label": [1.0 if label is None else label for label in labels],
        }

    return validate_pairs(convert_rows(ds, convert, consumed, PAIR_FEATURES))


def load_groups(
    source: str | os.PathLike | Dataset | DatasetDict,
    *,
    split: str | None = None,
    image_root: str | os.PathLike | None = None,
    **load_kwargs: Any,
) -> Dataset:
    """Plain ranked groups (`prompt`, `images` as paths/bytes/`Image`s, `ranks`) -> ranked groups."""
    ds, root = load_source(source, split, load_kwargs)
    ds = require_columns(ds, ["prompt", "images", "ranks"], "groups")
    return validate_groups(_list_groups(ds, image_root or root, "groups", "images", "ranks", list, ["images", "ranks"]))


FORMATS: dict[str, Callable[..., Dataset]] = {
    "pickapic": load_pickapic,
    "hpdv3": load_hpdv3,
    "hpdv2": load_hpdv2,
    "imagereward": load_imagereward,
    "genai_bench": load_genai_bench,
    "pairs": load_pairs,
    "groups": load_groups,
}
"""Adapter per format name, for `load_preference_data`."""


def load_preference_data(
    source: str | os.PathLike | Dataset | DatasetDict,
    *,
    format: str,
    split: str | None = None,
    image_root: str | os.PathLike | None = None,
    missing_images: str = "raise",
    **load_kwargs: Any,
) -> Dataset:
    """Load `source` with the adapter of `format` (a key of `FORMATS`); `load_kwargs` go to `load_dataset`.

    `missing_images="keep"` keeps the path of an image file that does not exist instead of raising, so a consumer
    that reports unreadable rows (the training cache) reports that row too."""
    if format not in FORMATS:
        raise ValueError(f"unknown preference-data format {format!r}; known: {', '.join(FORMATS)}")
    if missing_images not in ("raise", "keep"):
        raise ValueError(f"`missing_images` must be 'raise' or 'keep', got {missing_images!r}")
    before, LOADING["missing_images"] = LOADING["missing_images"], missing_images
    try:
        return FORMATS[format](source, split=split, image_root=image_root, **load_kwargs)
    finally:
        LOADING["missing_images"] = before


# ----------------------------------------------------------------------------------------------------------
# Benchmarks
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Benchmark:
    """A benchmark of the paper: its format, the schema it yields, and where its test data is on the Hub.

    The Hub locations are best-known defaults; override them with `load_benchmark(hub_id=..., **load_kwargs)`
    or load a local copy with `path=`. When `images_on_hub` is False the Hub files hold image paths only
    (the images ship in archives), so loading from the Hub needs `image_root`, the extracted images.
    """

    format: str
    schema: str
    hub_id: str
    split: str = "test"
    config: str | None = None
    data_files: Mapping[str, str] | None = None
    images_on_hub: bool = True


BENCHMARKS: dict[str, Benchmark] = {
    "hpdv3": Benchmark("hpdv3", "pairs", "MizzenAI/HPDv3", data_files={"test": "test.json"}, images_on_hub=False),
    "hpdv2": Benchmark("hpdv2", "groups", "zhwang/HPDv2", data_files={"test": "test.json"}, images_on_hub=False),
    "imagereward": Benchmark(
        "imagereward",
        "groups",
        "THUDM/ImageRewardDB",
        data_files={"test": "metadata-test.parquet"},
        images_on_hub=False,
    ),
    "pickapic_v2": Benchmark(
        "pickapic", "pairs", "yuvalkirstain/pickapic_v2", data_files={"test": "data/test-*.parquet"}
    ),
    "genai_bench": Benchmark("genai_bench", "pairs", "TIGER-Lab/GenAI-Bench", config="image_generation"),
}
"""The paper's evaluation benchmarks (SPEC §6) by name."""


def load_benchmark(
    name: str,
    /,
    path: str | os.PathLike | Dataset | DatasetDict | None = None,
    *,
    split: str | None = None,
    image_root: str | os.PathLike | None = None,
    hub_id: str | None = None,
    **load_kwargs: Any,
) -> Dataset:
    """Load benchmark `name` from a local copy `path` when given, else from the Hub.

    `hub_id` and `load_kwargs` (e.g. `name=` for the config, `data_files=`) override the registry's Hub defaults.
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    bench = BENCHMARKS[name]
    split = split or bench.split
    if path is not None:
        return load_preference_data(path, format=bench.format, split=split, image_root=image_root, **load_kwargs)
    hub_id = hub_id or bench.hub_id
    if not bench.images_on_hub and image_root is None:
        raise ValueError(
            f"benchmark {name!r}: the Hub copy {hub_id} keeps its images in archives; extract them and pass "
            "image_root=, or pass path= to a local copy"
        )
    load_kwargs = {"name": bench.config, "data_files": bench.data_files, **load_kwargs}
    return load_preference_data(hub_id, format=bench.format, split=split, image_root=image_root, **load_kwargs)


def _list_groups(
    ds: Dataset,
    root: str | os.PathLike | None,
    what: str,
    images_column: str,
    ranks_column: str,
    to_ranks: Callable[[list], list[int]],
    consumed: list[str],
) -> Dataset:
    """Rows that each hold a group (a list of images and per-image ranks or scores) -> the group schema."""
    ds = undecoded(ds, [images_column])

    def convert(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {"images": [], "ranks": []}
        for row, images, values in zip(indices, batch[images_column], batch[ranks_column]):
            if not isinstance(images, list) or not isinstance(values, list) or len(images) != len(values):
                raise ValueError(
                    f"{what} row {row}: {images_column}={images!r:.80} and {ranks_column}={values!r:.80} "
                    "must be lists of the same length"
                )
            out["images"].append([image_cell(v, root, row, f"{what} {images_column}") for v in images])
            out["ranks"].append(to_ranks(values))
        return out

    return convert_rows(ds, convert, consumed, GROUP_FEATURES)
