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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
from datasets import (
    Dataset,
    DatasetDict,
    Features,
    Image,
    LargeList,
    List,
    Value,
    load_dataset,
    load_from_disk,
)
from datasets.fingerprint import Hasher

PAIR_FEATURES = Features({"prompt": Value("string"), "chosen": Image(), "rejected": Image(), "label": Value("float32")})
"""Preference pairs. `label` is P(chosen preferred): 1.0 a clear preference, 0.5 a tie, soft values allowed."""

GROUP_FEATURES = Features({"prompt": Value("string"), "images": List(Image()), "ranks": List(Value("int32"))})
"""Ranked groups: several images for one prompt; a lower rank is better, equal ranks are ties."""

TIE_LABEL = 0.5

_KINDS = {
    "prompt": {"string"},
    "chosen": {"image"},
    "rejected": {"image"},
    "label": {"float", "integer"},
    "images": {"list of image"},
    "ranks": {"list of integer"},
}
_LOADING = {"missing_images": "raise"}
"""What `_image_cell` does with a path to no file, set by `load_preference_data(missing_images=...)` while it loads
(a plain dict: `datasets` hashes the adapters' functions, and a context variable cannot be hashed)."""
_FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json"}
_GENAI_VOTES = {"leftvote": (0, 1.0), "rightvote": (1, 1.0), "tievote": (0, TIE_LABEL), "bothbad_vote": (0, TIE_LABEL)}


# ----------------------------------------------------------------------------------------------------------
# Schemas
# ----------------------------------------------------------------------------------------------------------
def validate_pairs(pairs: Dataset) -> Dataset:
    """Check `pairs` against the pair schema; return it with `PAIR_FEATURES` types. Extra columns are kept."""
    pairs = _check_schema(pairs, PAIR_FEATURES, "pairs")
    labels = np.asarray(pairs.with_format("numpy")["label"], dtype=np.float64)
    bad = np.flatnonzero(~((labels >= 0.0) & (labels <= 1.0)))
    if bad.size:
        raise ValueError(
            f"pairs: label must be in [0, 1], row {bad[0]} has {labels[bad[0]]} ({bad.size} such rows in all)"
        )
    return pairs


def validate_groups(groups: Dataset) -> Dataset:
    """Check `groups` against the ranked-group schema; return it with `GROUP_FEATURES` types."""
    groups = _check_schema(groups, GROUP_FEATURES, "groups")
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
    groups = _undecoded(validate_groups(groups), ["images"])
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
    ds, root = _load_source(source, split, load_kwargs)
    consumed = ["caption", "jpg_0", "jpg_1", "label_0", "label_1"]
    ds = _undecoded(_require_columns(ds, consumed, "Pick-a-Pic"), ["jpg_0", "jpg_1"])
    root = image_root or root

    def convert(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {"prompt": batch["caption"], "chosen": [], "rejected": [], "label": []}
        for row, jpg_0, jpg_1, label_0, label_1 in zip(
            indices, batch["jpg_0"], batch["jpg_1"], batch["label_0"], batch["label_1"]
        ):
            if not _is_unit(label_0) or not _is_unit(label_1) or abs(label_0 + label_1 - 1.0) > 1e-6:
                raise ValueError(
                    f"Pick-a-Pic row {row}: label_0={label_0}, label_1={label_1}; need values in [0, 1] summing to 1"
                )
            first_wins = label_0 >= label_1
            out["chosen"].append(_image_cell(jpg_0 if first_wins else jpg_1, root, row, "Pick-a-Pic"))
            out["rejected"].append(_image_cell(jpg_1 if first_wins else jpg_0, root, row, "Pick-a-Pic"))
            out["label"].append(max(label_0, label_1))
        return out

    return validate_pairs(_convert(ds, convert, consumed, PAIR_FEATURES))


def load_hpdv3(
    source: str | os.PathLike | Dataset | DatasetDict,
    *,
    split: str | None = None,
    image_root: str | os.PathLike | None = None,
    **load_kwargs: Any,
) -> Dataset:
    """HPDv3 pair records (`prompt`, `path1` preferred, `path2`; paths relative to `image_root`) -> pairs."""
    ds, root = _load_source(source, split, load_kwargs)
    consumed = ["path1", "path2"]
    ds = _require_columns(ds, ["prompt", *consumed], "HPDv3")
    root = image_root or root

    def convert(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        return {
            "chosen": [_image_cell(p, root, row, "HPDv3 path1") for row, p in zip(indices, batch["path1"])],
            "rejected": [_image_cell(p, root, row, "HPDv3 path2") for row, p in zip(indices, batch["path2"])],
            "label": [1.0] * len(indices),
        }

    return validate_pairs(_convert(ds, convert, consumed, PAIR_FEATURES))


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
    ds, root = _load_source(source, split, load_kwargs)
    images_column = _first_present(ds, ["image", "image_path"], "HPDv2")
    ranks_column = _first_present(ds, ["rank", "human_preference"], "HPDv2")
    consumed = [c for c in ("image", "image_path", "rank", "human_preference") if c in ds.column_names]
    ds = _require_columns(ds, ["prompt"], "HPDv2")
    to_ranks = _ranks_from_scores if ranks_column == "human_preference" else list
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
    ds, root = _load_source(source, split, load_kwargs)
    root = image_root or root
    if "generations" in ds.column_names:
        ds = _require_columns(ds, ["prompt", "ranking"], "ImageReward")
        groups = _list_groups(ds, root, "ImageReward", "generations", "ranking", list, ["generations", "ranking"])
        return validate_groups(groups)
    ds = _require_columns(ds, ["prompt_id", "prompt", "rank"], "ImageRewardDB")
    image_column = _first_present(ds, ["image", "image_path"], "ImageRewardDB")
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
    images = _undecoded(ds.select_columns([image_column]), [image_column])

    def gather(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"images": [], "ranks": []}
        for rows in batch["rows"]:
            cells = zip(rows, images[rows][image_column])
            out["images"].append([_image_cell(v, root, r, f"ImageRewardDB {image_column}") for r, v in cells])
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
    ds, root = _load_source(source, split, load_kwargs)
    consumed = ["left_image", "right_image"]
    ds = _undecoded(_require_columns(ds, ["prompt", *consumed, "vote_type"], "GenAI-Bench"), consumed)
    root = image_root or root

    def convert(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {"chosen": [], "rejected": [], "label": []}
        for row, left, right, vote in zip(indices, batch["left_image"], batch["right_image"], batch["vote_type"]):
            if vote not in _GENAI_VOTES:
                raise ValueError(f"GenAI-Bench row {row}: vote_type {vote!r} is not one of {sorted(_GENAI_VOTES)}")
            winner, label = _GENAI_VOTES[vote]
            sides = (left, right) if winner == 0 else (right, left)
            out["chosen"].append(_image_cell(sides[0], root, row, "GenAI-Bench"))
            out["rejected"].append(_image_cell(sides[1], root, row, "GenAI-Bench"))
            out["label"].append(label)
        return out

    return validate_pairs(_convert(ds, convert, consumed, PAIR_FEATURES))


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
    ds, root = _load_source(source, split, load_kwargs)
    consumed = ["chosen", "rejected", "label"] if "label" in ds.column_names else ["chosen", "rejected"]
    ds = _undecoded(_require_columns(ds, ["prompt", "chosen", "rejected"], "pairs"), ["chosen", "rejected"])
    root = image_root or root

    def convert(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        labels = batch["label"] if "label" in batch else [None] * len(indices)
        return {
            "chosen": [_image_cell(v, root, row, "pairs chosen") for row, v in zip(indices, batch["chosen"])],
            "rejected": [_image_cell(v, root, row, "pairs rejected") for row, v in zip(indices, batch["rejected"])],
            "label": [1.0 if label is None else label for label in labels],
        }

    return validate_pairs(_convert(ds, convert, consumed, PAIR_FEATURES))


def load_groups(
    source: str | os.PathLike | Dataset | DatasetDict,
    *,
    split: str | None = None,
    image_root: str | os.PathLike | None = None,
    **load_kwargs: Any,
) -> Dataset:
    """Plain ranked groups (`prompt`, `images` as paths/bytes/`Image`s, `ranks`) -> ranked groups."""
    ds, root = _load_source(source, split, load_kwargs)
    ds = _require_columns(ds, ["prompt", "images", "ranks"], "groups")
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
    before, _LOADING["missing_images"] = _LOADING["missing_images"], missing_images
    try:
        return FORMATS[format](source, split=split, image_root=image_root, **load_kwargs)
    finally:
        _LOADING["missing_images"] = before


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


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------
def _load_source(
    source: str | os.PathLike | Dataset | DatasetDict, split: str | None, load_kwargs: dict[str, Any]
) -> tuple[Dataset, Path | None]:
    """Load `source` as one split; also return the folder relative image paths resolve against (local sources)."""
    root = None
    is_local = isinstance(source, (Dataset, DatasetDict)) or Path(source).expanduser().exists()
    if load_kwargs and is_local:
        raise TypeError(f"load_dataset arguments {sorted(load_kwargs)} apply to Hub sources only")
    if isinstance(source, (Dataset, DatasetDict)):
        ds = source
    else:
        path = Path(source).expanduser()
        if path.is_file():
            ds, root = _load_files([path], str(path)), path.parent
        elif path.is_dir():
            ds, root = _load_folder(path, split), path
        elif path.suffix in _FILE_BUILDERS or str(source).startswith((".", "/", "~")):
            raise FileNotFoundError(f"no such file or folder: {source}")
        else:
            ds = load_dataset(str(source), split=split, **load_kwargs)
    if isinstance(ds, DatasetDict):
        ds = _pick_split(ds, split, str(source))
    if not isinstance(ds, Dataset):
        raise TypeError(f"{source!r} loaded as {type(ds).__name__}, expected a datasets.Dataset")
    if len(ds) == 0:
        raise ValueError(f"{source if isinstance(source, (str, os.PathLike)) else 'the dataset'} has no rows")
    return ds, root


def _load_folder(folder: Path, split: str | None) -> Dataset | DatasetDict:
    """A `save_to_disk` folder, or the data files of `split` (all data files when None) in `folder` or `folder/data`."""
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        return load_from_disk(str(folder))
    found = sorted(
        f for d in (folder, folder / "data") if d.is_dir() for f in d.iterdir() if f.suffix in _FILE_BUILDERS
    )
    files = [f for f in found if split is None or f.stem == split or f.name.startswith(f"{split}-")]
    if not files:
        names = ", ".join(f.name for f in found) or "none"
        raise FileNotFoundError(f"no data files for split {split!r} in {folder} (data files there: {names})")
    return _load_files(files, str(folder))


def _load_files(files: list[Path], what: str) -> Dataset:
    """Load parquet or JSON/JSONL files of one builder as one dataset."""
    builders = {_FILE_BUILDERS.get(f.suffix) for f in files}
    if len(builders) != 1 or None in builders:
        raise ValueError(f"{what}: expected parquet or JSON/JSONL files of one kind, got {[f.name for f in files]}")
    builder = builders.pop()
    if builder == "json":
        _check_utf8(files)
    return load_dataset(builder, data_files=[str(f) for f in files], split="train")


def _check_utf8(files: list[Path]) -> None:
    """JSON text must be UTF-8: pyarrow loads other bytes into string columns that fail only when a row is read."""
    for file in files:
        with open(file, "rb") as f:
            for number, line in enumerate(f, 1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise ValueError(
                        f"{file}: line {number} (row {number - 1} of a JSONL file) is not UTF-8 text ({err.reason} "
                        f"at byte {err.start}); re-encode the file as UTF-8."
                    ) from None


def _pick_split(dataset_dict: DatasetDict, split: str | None, what: str) -> Dataset:
    """One split of `dataset_dict`; `split=None` is allowed only when it has a single split."""
    if split is None and len(dataset_dict) == 1:
        return next(iter(dataset_dict.values()))
    if split not in dataset_dict:
        raise ValueError(f"{what}: pass split= as one of {list(dataset_dict)} (got {split!r})")
    return dataset_dict[split]


def _kind(feature: Any) -> str:
    """A coarse type name of a `datasets` feature, for schema checks and messages."""
    if isinstance(feature, Image):
        return "image"
    if isinstance(feature, (List, LargeList)):
        return f"list of {_kind(feature.feature)}"
    if isinstance(feature, Value):
        if feature.dtype in ("string", "large_string"):
            return "string"
        if feature.dtype.startswith(("int", "uint")):
            return "integer"
        if feature.dtype.startswith("float"):
            return "float"
    return repr(feature)


def _check_schema(ds: Dataset, features: Features, what: str) -> Dataset:
    """Check `ds` has the columns of `features` with compatible types and rows; cast those columns to `features`."""
    if not isinstance(ds, Dataset):
        raise TypeError(f"{what}: expected a datasets.Dataset, got {type(ds).__name__}")
    _require_columns(ds, list(features), what)
    for name in features:
        kind = _kind(ds.features[name])
        if kind not in _KINDS[name]:
            raise TypeError(f"{what}: column {name!r} must be {' or '.join(sorted(_KINDS[name]))}, got {kind}")
    if len(ds) == 0:
        raise ValueError(f"{what}: the dataset is empty")
    for name, feature in features.items():
        if ds.features[name] != feature:
            ds = ds.cast_column(name, feature)
    return ds


def _require_columns(ds: Dataset, columns: Iterable[str], what: str) -> Dataset:
    """Return `ds`, or raise naming the `columns` it lacks."""
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise ValueError(f"{what}: missing column(s) {missing}; the data has {ds.column_names}")
    return ds


def _first_present(ds: Dataset, candidates: list[str], what: str) -> str:
    """The first of `candidates` that is a column of `ds`."""
    for name in candidates:
        if name in ds.column_names:
            return name
    raise ValueError(f"{what}: needs one of the columns {candidates}; the data has {ds.column_names}")


def _undecoded(ds: Dataset, columns: list[str]) -> Dataset:
    """Switch `Image` (or list-of-`Image`) `columns` to undecoded storage dicts, so reading them stays cheap."""
    for name in columns:
        feature = ds.features[name]
        if isinstance(feature, Image):
            ds = ds.cast_column(name, Image(decode=False))
        elif isinstance(feature, (List, LargeList)) and isinstance(feature.feature, Image):
            ds = ds.cast_column(name, List(Image(decode=False)))
    return ds


def _image_cell(value: Any, root: str | os.PathLike | None, row: int, what: str) -> dict[str, Any]:
    """An image given as bytes, a path or an undecoded `Image` dict, as `Image` storage; paths must exist."""
    if isinstance(value, bytes):
        return {"bytes": value, "path": None}
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return {"bytes": value["bytes"], "path": value.get("path")}
        value = value.get("path")
    if isinstance(value, (str, os.PathLike)) and str(value):
        path = Path(root or "") / value
        if not path.is_file() and _LOADING["missing_images"] == "raise":
            raise FileNotFoundError(f"{what} row {row}: image not found: {path}")
        return {"bytes": None, "path": str(path)}
    raise TypeError(f"{what} row {row}: expected image bytes or a path, got {value!r:.80}")


def _is_unit(value: Any) -> bool:
    """Whether `value` is a number in [0, 1]."""
    return isinstance(value, (int, float)) and 0.0 <= value <= 1.0


def _ranks_from_scores(scores: list[float]) -> list[int]:
    """Ranks (1 = best, ties equal) from per-image scores where higher is better."""
    return [1 + sum(other > score for other in scores) for score in scores]


def _convert(
    ds: Dataset, fn: Callable[[dict[str, list], list[int]], dict[str, list]], consumed: list[str], schema: Features
) -> Dataset:
    """Batched `map` of `fn` over `ds` into `schema`, dropping the `consumed` source columns and keeping the rest."""
    kept = {name: feature for name, feature in ds.features.items() if name not in consumed and name not in schema}
    features = Features({**schema, **kept})
    # The missing-images mode changes the result, so it is part of the cached result's fingerprint.
    fingerprint = Hasher.hash([ds._fingerprint, fn, features, _LOADING["missing_images"]])
    return ds.map(
        fn, batched=True, with_indices=True, remove_columns=consumed, features=features, new_fingerprint=fingerprint
    )


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
    ds = _undecoded(ds, [images_column])

    def convert(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {"images": [], "ranks": []}
        for row, images, values in zip(indices, batch[images_column], batch[ranks_column]):
            if not isinstance(images, list) or not isinstance(values, list) or len(images) != len(values):
                raise ValueError(
                    f"{what} row {row}: {images_column}={images!r:.80} and {ranks_column}={values!r:.80} "
                    "must be lists of the same length"
                )
            out["images"].append([_image_cell(v, root, row, f"{what} {images_column}") for v in images])
            out["ranks"].append(to_ranks(values))
        return out

    return _convert(ds, convert, consumed, GROUP_FEATURES)
