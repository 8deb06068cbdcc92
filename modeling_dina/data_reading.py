"""Reading preference data for `modeling_dina.data`: sources (Hub ids, files, folders), the column checks and
conversions the adapters share, and the image cells they produce."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

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

COLUMN_KINDS = {
    "prompt": {"string"},
    "chosen": {"image"},
    "rejected": {"image"},
    "label": {"float", "integer"},
    "images": {"list of image"},
    "ranks": {"list of integer"},
}
LOADING = {"missing_images": "raise"}
"""What `image_cell` does with a path to no file, set by `load_preference_data(missing_images=...)` while it loads
(a plain dict: `datasets` hashes the adapters' functions, and a context variable cannot be hashed)."""
FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json"}


def load_source(
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
            ds, root = load_files([path], str(path)), path.parent
        elif path.is_dir():
            ds, root = load_folder(path, split), path
        elif path.suffix in FILE_BUILDERS or str(source).startswith((".", "/", "~")):
            raise FileNotFoundError(f"no such file or folder: {source}")
        else:
            ds = load_dataset(str(source), split=split, **load_kwargs)
    if isinstance(ds, DatasetDict):
        ds = pick_split(ds, split, str(source))
    if not isinstance(ds, Dataset):
        raise TypeError(f"{source!r} loaded as {type(ds).__name__}, expected a datasets.Dataset")
    if len(ds) == 0:
        raise ValueError(f"{source if isinstance(source, (str, os.PathLike)) else 'the dataset'} has no rows")
    return ds, root


def load_folder(folder: Path, split: str | None) -> Dataset | DatasetDict:
    """A `save_to_disk` folder, or the data files of `split` (all data files when None) in `folder` or `folder/data`."""
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        return load_from_disk(str(folder))
    found = sorted(f for d in (folder, folder / "data") if d.is_dir() for f in d.iterdir() if f.suffix in FILE_BUILDERS)
    files = [f for f in found if split is None or f.stem == split or f.name.startswith(f"{split}-")]
    if not files:
        names = ", ".join(f.name for f in found) or "none"
        raise FileNotFoundError(f"no data files for split {split!r} in {folder} (data files there: {names})")
    return load_files(files, str(folder))


def load_files(files: list[Path], what: str) -> Dataset:
    """Load parquet or JSON/JSONL files of one builder as one dataset."""
    builders = {FILE_BUILDERS.get(f.suffix) for f in files}
    if len(builders) != 1 or None in builders:
        raise ValueError(f"{what}: expected parquet or JSON/JSONL files of one kind, got {[f.name for f in files]}")
    builder = builders.pop()
    if builder == "json":
        check_utf8(files)
    return load_dataset(builder, data_files=[str(f) for f in files], split="train")


def check_utf8(files: list[Path]) -> None:
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


def pick_split(dataset_dict: DatasetDict, split: str | None, what: str) -> Dataset:
    """One split of `dataset_dict`; `split=None` is allowed only when it has a single split."""
    if split is None and len(dataset_dict) == 1:
        return next(iter(dataset_dict.values()))
    if split not in dataset_dict:
        raise ValueError(f"{what}: pass split= as one of {list(dataset_dict)} (got {split!r})")
    return dataset_dict[split]


def feature_kind(feature: Any) -> str:
    """A coarse type name of a `datasets` feature, for schema checks and messages."""
    if isinstance(feature, Image):
        return "image"
    if isinstance(feature, (List, LargeList)):
        return f"list of {feature_kind(feature.feature)}"
    if isinstance(feature, Value):
        if feature.dtype in ("string", "large_string"):
            return "string"
        if feature.dtype.startswith(("int", "uint")):
            return "integer"
        if feature.dtype.startswith("float"):
            return "float"
    return repr(feature)


def check_schema(ds: Dataset, features: Features, what: str) -> Dataset:
    """Check `ds` has the columns of `features` with compatible types and rows; cast those columns to `features`."""
    if not isinstance(ds, Dataset):
        raise TypeError(f"{what}: expected a datasets.Dataset, got {type(ds).__name__}")
    require_columns(ds, list(features), what)
    for name in features:
        kind = feature_kind(ds.features[name])
        if kind not in COLUMN_KINDS[name]:
            raise TypeError(f"{what}: column {name!r} must be {' or '.join(sorted(COLUMN_KINDS[name]))}, got {kind}")
    if len(ds) == 0:
        raise ValueError(f"{what}: the dataset is empty")
    for name, feature in features.items():
        if ds.features[name] != feature:
            ds = ds.cast_column(name, feature)
    return ds


def require_columns(ds: Dataset, columns: Iterable[str], what: str) -> Dataset:
    """Return `ds`, or raise naming the `columns` it lacks."""
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise ValueError(f"{what}: missing column(s) {missing}; the data has {ds.column_names}")
    return ds


def first_present(ds: Dataset, candidates: list[str], what: str) -> str:
    """The first of `candidates` that is a column of `ds`."""
    for name in candidates:
        if name in ds.column_names:
            return name
    raise ValueError(f"{what}: needs one of the columns {candidates}; the data has {ds.column_names}")


def undecoded(ds: Dataset, columns: list[str]) -> Dataset:
    """Switch `Image` (or list-of-`Image`) `columns` to undecoded storage dicts, so reading them stays cheap."""
    for name in columns:
        feature = ds.features[name]
        if isinstance(feature, Image):
            ds = ds.cast_column(name, Image(decode=False))
        elif isinstance(feature, (List, LargeList)) and isinstance(feature.feature, Image):
            ds = ds.cast_column(name, List(Image(decode=False)))
    return ds


def image_cell(value: Any, root: str | os.PathLike | None, row: int, what: str) -> dict[str, Any]:
    """An image given as bytes, a path or an undecoded `Image` dict, as `Image` storage; paths must exist."""
    if isinstance(value, bytes):
        return {"bytes": value, "path": None}
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return {"bytes": value["bytes"], "path": value.get("path")}
        value = value.get("path")
    if isinstance(value, (str, os.PathLike)) and str(value):
        path = Path(root or "") / value
        if not path.is_file() and LOADING["missing_images"] == "raise":
            raise FileNotFoundError(f"{what} row {row}: image not found: {path}")
        return {"bytes": None, "path": str(path)}
    raise TypeError(f"{what} row {row}: expected image bytes or a path, got {value!r:.80}")


def is_unit(value: Any) -> bool:
    """Whether `value` is a number in [0, 1]."""
    return isinstance(value, (int, float)) and 0.0 <= value <= 1.0


def ranks_from_scores(scores: list[float]) -> list[int]:
    """Ranks (1 = best, ties equal) from per-image scores where higher is better."""
    return [1 + sum(other > score for other in scores) for score in scores]


def convert_rows(
    ds: Dataset, fn: Callable[[dict[str, list], list[int]], dict[str, list]], consumed: list[str], schema: Features
) -> Dataset:
    """Batched `map` of `fn` over `ds` into `schema`, dropping the `consumed` source columns and keeping the rest."""
    kept = {name: feature for name, feature in ds.features.items() if name not in consumed and name not in schema}
    features = Features({**schema, **kept})
    # The missing-images mode changes the result, so it is part of the cached result's fingerprint.
    fingerprint = Hasher.hash([ds._fingerprint, fn, features, LOADING["missing_images"]])
    return ds.map(
        fn, batched=True, with_indices=True, remove_columns=consumed, features=features, new_fingerprint=fingerprint
    )


__all__ = [
    "COLUMN_KINDS",
    "FILE_BUILDERS",
    "LOADING",
    "check_schema",
    "check_utf8",
    "convert_rows",
    "feature_kind",
    "first_present",
    "image_cell",
    "is_unit",
    "load_files",
    "load_folder",
    "load_source",
    "pick_split",
    "ranks_from_scores",
    "require_columns",
    "undecoded",
]
