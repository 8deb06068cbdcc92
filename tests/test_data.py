"""Tests for modeling_dina.data: schemas, adapters (fixtures in each source's own layout), benchmarks, errors."""

import io
import json

import datasets
import pytest
from datasets import Dataset, Features, Image, List, Value
from PIL import Image as PILImage

from modeling_dina.data import (
    BENCHMARKS,
    FORMATS,
    GROUP_FEATURES,
    PAIR_FEATURES,
    groups_to_pairs,
    load_benchmark,
    load_genai_bench,
    load_groups,
    load_hpdv2,
    load_hpdv3,
    load_imagereward,
    load_pairs,
    load_pickapic,
    load_preference_data,
    validate_groups,
    validate_pairs,
)

COLORS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    datasets.disable_progress_bars()


def png_bytes(color: str) -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", (4, 4), COLORS[color]).save(buffer, format="PNG")
    return buffer.getvalue()


def write_images(folder, names=COLORS):
    """Write `<color>.png` files under `folder`; return their names."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / f"{name}.png").write_bytes(png_bytes(name))
    return [f"{name}.png" for name in names]


def color(image) -> str:
    rgb = image.convert("RGB").getpixel((0, 0))
    return next(name for name, value in COLORS.items() if value == rgb)


def colors(column) -> list[str]:
    return [color(image) for image in column]


def write_json(path, records, lines=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(json.dumps(r) for r in records) if lines else json.dumps(records)
    path.write_text(text)
    return path


def core_features(ds, schema):
    return {name: ds.features[name] for name in schema}


# --------------------------------------------------------------------------------------------------------------
# Pick-a-Pic v2
# --------------------------------------------------------------------------------------------------------------
def pickapic_rows(label_0, label_1):
    n = len(label_0)
    return {
        "caption": [f"prompt {i}" for i in range(n)],
        "jpg_0": [png_bytes("red")] * n,
        "jpg_1": [png_bytes("blue")] * n,
        "label_0": label_0,
        "label_1": label_1,
        "ranking_id": list(range(100, 100 + n)),
    }


def test_pickapic_from_parquet_folder_picks_preferred_and_ties(tmp_path):
    source = Dataset.from_dict(pickapic_rows([1.0, 0.0, 0.5], [0.0, 1.0, 0.5]))
    (tmp_path / "data").mkdir()
    source.to_parquet(tmp_path / "data" / "test-00000-of-00001.parquet")
    Dataset.from_dict(pickapic_rows([1.0], [0.0])).to_parquet(tmp_path / "data" / "test_unique-00000.parquet")

    pairs = load_pickapic(tmp_path, split="test")

    assert core_features(pairs, PAIR_FEATURES) == dict(PAIR_FEATURES)
    assert len(pairs) == 3  # test_unique shards are not part of split "test"
    assert pairs["prompt"] == ["prompt 0", "prompt 1", "prompt 2"]
    assert colors(pairs["chosen"]) == ["red", "blue", "red"]
    assert colors(pairs["rejected"]) == ["blue", "red", "blue"]
    assert list(pairs["label"]) == [1.0, 1.0, 0.5]
    assert list(pairs["ranking_id"]) == [100, 101, 102]
    assert "jpg_0" not in pairs.column_names


@pytest.mark.parametrize(("label_0", "label_1"), [(1.0, 1.0), (1.5, -0.5), (None, 1.0)])
def test_pickapic_rejects_bad_labels(label_0, label_1):
    source = Dataset.from_dict(pickapic_rows([1.0, label_0], [0.0, label_1]))
    with pytest.raises(ValueError, match=r"Pick-a-Pic row 1: label_0=.*in \[0, 1\]"):
        load_pickapic(source)


def test_pickapic_names_missing_columns():
    source = Dataset.from_dict(pickapic_rows([1.0], [0.0])).remove_columns(["label_1"])
    with pytest.raises(ValueError, match=r"Pick-a-Pic: missing column\(s\) \['label_1'\]"):
        load_pickapic(source)


# --------------------------------------------------------------------------------------------------------------
# HPDv3
# --------------------------------------------------------------------------------------------------------------
def test_hpdv3_json_with_images_next_to_it(tmp_path):
    write_images(tmp_path / "images")
    records = [
        {"prompt": "a", "path1": "images/green.png", "path2": "images/red.png", "model1": "m1", "model2": "m2"},
        {"prompt": "b", "path1": "images/black.png", "path2": "images/white.png", "model1": "m3", "model2": "m4"},
    ]
    write_json(tmp_path / "test.json", records)
    write_json(tmp_path / "train.json", records[:1])

    pairs = load_hpdv3(tmp_path, split="test")

    assert len(pairs) == 2
    assert colors(pairs["chosen"]) == ["green", "black"]
    assert colors(pairs["rejected"]) == ["red", "white"]
    assert list(pairs["label"]) == [1.0, 1.0]
    assert pairs["model1"] == ["m1", "m3"]


def test_hpdv3_image_root_and_missing_image(tmp_path):
    write_images(tmp_path / "extracted")
    good = write_json(tmp_path / "meta" / "test.json", [{"prompt": "a", "path1": "green.png", "path2": "red.png"}])
    pairs = load_hpdv3(good, image_root=tmp_path / "extracted")
    assert colors(pairs["chosen"]) == ["green"]
    assert colors(pairs["rejected"]) == ["red"]

    records = [{"prompt": "a", "path1": "green.png", "path2": "red.png"}]
    records.append({"prompt": "b", "path1": "green.png", "path2": "gone.png"})
    bad = write_json(tmp_path / "meta" / "bad.json", records)
    with pytest.raises(FileNotFoundError, match=r"HPDv3 path2 row 1: image not found: .*extracted/gone\.png"):
        load_hpdv3(bad, image_root=tmp_path / "extracted")


def test_hpdv3_names_missing_columns(tmp_path):
    file = write_json(tmp_path / "test.json", [{"prompt": "a", "path1": "x.png"}])
    with pytest.raises(ValueError, match=r"HPDv3: missing column\(s\) \['path2'\]"):
        load_hpdv3(file)


# --------------------------------------------------------------------------------------------------------------
# HPDv2 and ImageReward -> ranked groups
# --------------------------------------------------------------------------------------------------------------
def test_hpdv2_test_rows_become_groups_and_pairs(tmp_path):
    write_images(tmp_path / "test")
    records = [
        {"prompt": "a", "image_path": ["test/red.png", "test/green.png", "test/blue.png"], "rank": [2, 1, 3]},
        {"prompt": "b", "image_path": ["test/white.png"], "rank": [1]},
    ]
    write_json(tmp_path / "test.json", records)

    groups = load_hpdv2(tmp_path, split="test")

    assert core_features(groups, GROUP_FEATURES) == dict(GROUP_FEATURES)
    assert [colors(images) for images in groups["images"]] == [["red", "green", "blue"], ["white"]]
    assert groups["ranks"] == [[2, 1, 3], [1]]
    pairs = groups_to_pairs(groups)
    assert len(pairs) == 3  # 3 * 2 / 2 from the first group, none from the group of one
    assert list(zip(colors(pairs["chosen"]), colors(pairs["rejected"]))) == [
        ("green", "red"),
        ("red", "blue"),
        ("green", "blue"),
    ]
    assert list(pairs["group_index"]) == [0, 0, 0]


def test_hpdv2_train_human_preference_with_ties(tmp_path):
    write_images(tmp_path)
    records = [
        {"prompt": "a", "image_path": ["red.png", "green.png"], "human_preference": [0, 1]},
        {"prompt": "b", "image_path": ["blue.png", "white.png"], "human_preference": [1, 1]},
    ]
    groups = load_hpdv2(write_json(tmp_path / "train.json", records))

    assert groups["ranks"] == [[2, 1], [1, 1]]
    strict = groups_to_pairs(groups)
    assert colors(strict["chosen"]) == ["green"]
    assert list(strict["label"]) == [1.0]
    with_ties = groups_to_pairs(groups, include_ties=True)
    assert colors(with_ties["chosen"]) == ["green", "blue"]
    assert colors(with_ties["rejected"]) == ["red", "white"]
    assert list(with_ties["label"]) == [1.0, 0.5]
    assert list(with_ties["group_index"]) == [0, 1]


def test_hpdv2_prefers_embedded_images_and_checks_lengths():
    features = Features({"prompt": Value("string"), "image": List(Image()), "rank": List(Value("int64"))})
    source = Dataset.from_dict(
        {"prompt": ["a"], "image": [[png_bytes("black"), png_bytes("white")]], "rank": [[2, 1]]}, features=features
    )
    groups = load_hpdv2(source)
    assert colors(groups[0]["images"]) == ["black", "white"]
    assert groups["ranks"] == [[2, 1]]

    bad = Dataset.from_dict(
        {"prompt": ["a", "b"], "image": [[png_bytes("red")], [png_bytes("red")]], "rank": [[1], [1, 2]]},
        features=features,
    )
    with pytest.raises(ValueError, match=r"HPDv2 row 1: .*same length"):
        load_hpdv2(bad)
    with pytest.raises(ValueError, match=r"HPDv2: needs one of the columns \['rank', 'human_preference'\]"):
        load_hpdv2(source.remove_columns("rank"))


def test_imagereward_rows_are_grouped_by_prompt_id(tmp_path):
    write_images(tmp_path / "images")
    rows = [  # (prompt_id, image, rank): a group of 3 with a tie, a group of 1, a group of 2
        ("p1", "red", 1),
        ("p2", "white", 1),
        ("p1", "green", 2),
        ("p3", "black", 2),
        ("p1", "blue", 2),
        ("p3", "red", 1),
    ]
    source = Dataset.from_dict(
        {
            "prompt_id": [r[0] for r in rows],
            "prompt": [f"prompt of {r[0]}" for r in rows],
            "image_path": [f"images/{r[1]}.png" for r in rows],
            "rank": [r[2] for r in rows],
            "overall_rating": [5] * len(rows),
        }
    )
    source.to_parquet(tmp_path / "metadata-test.parquet")

    groups = load_imagereward(tmp_path / "metadata-test.parquet")

    assert groups["prompt_id"] == ["p1", "p2", "p3"]
    assert groups["prompt"] == ["prompt of p1", "prompt of p2", "prompt of p3"]
    assert [colors(images) for images in groups["images"]] == [["red", "green", "blue"], ["white"], ["black", "red"]]
    assert groups["ranks"] == [[1, 2, 2], [1], [2, 1]]
    strict = groups_to_pairs(groups)
    assert len(strict) == 3  # p1: 2 (tie dropped), p2: none, p3: 1
    assert list(zip(colors(strict["chosen"]), colors(strict["rejected"]))) == [
        ("red", "green"),
        ("red", "blue"),
        ("red", "black"),
    ]
    assert strict["prompt_id"] == ["p1", "p1", "p3"]
    with_ties = groups_to_pairs(groups, include_ties=True)
    assert len(with_ties) == 4
    assert sorted(with_ties["label"]) == [0.5, 1.0, 1.0, 1.0]


def test_imagereward_test_json_layout_and_missing_image(tmp_path):
    write_images(tmp_path)
    record = {"id": "x", "prompt": "a", "generations": ["green.png", "red.png"], "ranking": [1, 2]}
    groups = load_imagereward(write_json(tmp_path / "test.json", [record]))
    assert [colors(images) for images in groups["images"]] == [["green", "red"]]
    assert groups["ranks"] == [[1, 2]]

    record["generations"][1] = "nope.png"
    with pytest.raises(FileNotFoundError, match=r"ImageReward generations row 0: image not found: .*nope\.png"):
        load_imagereward(write_json(tmp_path / "bad.json", [record]))


# --------------------------------------------------------------------------------------------------------------
# GenAI-Bench
# --------------------------------------------------------------------------------------------------------------
def test_genai_bench_votes():
    votes = ["leftvote", "rightvote", "tievote", "bothbad_vote"]
    features = Features(
        {
            "prompt": Value("string"),
            "left_image": Image(),
            "right_image": Image(),
            "vote_type": Value("string"),
            "left_model": Value("string"),
        }
    )
    source = Dataset.from_dict(
        {
            "prompt": ["p"] * 4,
            "left_image": [png_bytes("red")] * 4,
            "right_image": [png_bytes("blue")] * 4,
            "vote_type": votes,
            "left_model": ["m"] * 4,
        },
        features=features,
    )
    pairs = load_genai_bench(source)

    assert colors(pairs["chosen"]) == ["red", "blue", "red", "red"]
    assert colors(pairs["rejected"]) == ["blue", "red", "blue", "blue"]
    assert list(pairs["label"]) == [1.0, 1.0, 0.5, 0.5]
    assert pairs["vote_type"] == votes
    assert "left_image" not in pairs.column_names

    bad = source.map(lambda row, i: {"vote_type": "maybe" if i == 2 else row["vote_type"]}, with_indices=True)
    with pytest.raises(ValueError, match=r"GenAI-Bench row 2: vote_type 'maybe' is not one of"):
        load_genai_bench(bad)


# --------------------------------------------------------------------------------------------------------------
# Plain JSONL pairs and groups
# --------------------------------------------------------------------------------------------------------------
def test_jsonl_pairs_relative_to_the_file(tmp_path):
    write_images(tmp_path / "pairs" / "img")
    lines = [
        {"prompt": "a", "chosen": "img/green.png", "rejected": "img/red.png", "source_id": "s0"},
        {"prompt": "b", "chosen": "img/white.png", "rejected": "img/black.png", "label": 0.5, "source_id": "s1"},
        {"prompt": "c", "chosen": "img/blue.png", "rejected": "img/red.png", "label": 0.8, "source_id": "s2"},
    ]
    file = write_json(tmp_path / "pairs" / "pairs.jsonl", lines, lines=True)

    for source in (file, file.parent):  # the file, or a folder holding only it
        pairs = load_pairs(source)
        assert colors(pairs["chosen"]) == ["green", "white", "blue"]
        assert colors(pairs["rejected"]) == ["red", "black", "red"]
        assert [round(x, 4) for x in pairs["label"]] == [1.0, 0.5, 0.8]
        assert pairs["source_id"] == ["s0", "s1", "s2"]


def test_jsonl_pairs_label_out_of_range_and_missing_image(tmp_path):
    write_images(tmp_path)
    line = {"prompt": "a", "chosen": "green.png", "rejected": "red.png", "label": 1.0}
    file = write_json(tmp_path / "p.jsonl", [line, {**line, "label": 1.5}], lines=True)
    with pytest.raises(ValueError, match=r"pairs: label must be in \[0, 1\], row 1 has 1.5"):
        load_pairs(file)
    file = write_json(tmp_path / "q.jsonl", [line, {**line, "chosen": "sub/none.png"}], lines=True)
    with pytest.raises(FileNotFoundError, match=r"pairs chosen row 1: image not found: .*sub/none\.png"):
        load_pairs(file)


def test_load_groups_saved_to_disk(tmp_path):
    write_images(tmp_path / "img")
    paths = [str(tmp_path / "img" / name) for name in ("red.png", "green.png", "blue.png", "white.png")]
    groups = load_groups(Dataset.from_dict({"prompt": ["a"], "images": [paths], "ranks": [[4, 3, 2, 1]]}))
    groups.save_to_disk(tmp_path / "saved")

    reloaded = load_groups(tmp_path / "saved")

    assert colors(reloaded[0]["images"]) == ["red", "green", "blue", "white"]
    pairs = groups_to_pairs(reloaded)
    assert len(pairs) == 6  # n(n-1)/2 for n=4 distinct ranks
    assert colors(pairs["chosen"]) == ["green", "blue", "white", "blue", "white", "white"]


# --------------------------------------------------------------------------------------------------------------
# Schemas and validators
# --------------------------------------------------------------------------------------------------------------
def test_validate_pairs_casts_and_rejects():
    base = {"prompt": ["a"], "chosen": [png_bytes("red")], "rejected": [png_bytes("blue")], "label": [1]}
    features = Features({"prompt": Value("string"), "chosen": Image(), "rejected": Image(), "label": Value("int64")})
    pairs = validate_pairs(Dataset.from_dict(base, features=features))
    assert pairs.features["label"] == Value("float32")

    with pytest.raises(ValueError, match=r"pairs: missing column\(s\) \['label'\]"):
        validate_pairs(Dataset.from_dict(base, features=features).remove_columns("label"))
    with pytest.raises(TypeError, match=r"pairs: column 'chosen' must be image, got string"):
        validate_pairs(Dataset.from_dict({**base, "chosen": ["red.png"]}))
    with pytest.raises(ValueError, match=r"label must be in \[0, 1\], row 0 has nan"):
        validate_pairs(Dataset.from_dict({**base, "label": [float("nan")]}, features=PAIR_FEATURES))
    with pytest.raises(ValueError, match=r"pairs: the dataset is empty"):
        validate_pairs(Dataset.from_dict({k: [] for k in base}, features=PAIR_FEATURES))


def test_validate_groups_rejects_mismatched_rows():
    images = [png_bytes("red"), png_bytes("blue")]
    ok = Dataset.from_dict({"prompt": ["a"], "images": [images], "ranks": [[1, 2]]}, features=GROUP_FEATURES)
    assert validate_groups(ok)["ranks"] == [[1, 2]]
    bad = Dataset.from_dict(
        {"prompt": ["a", "b"], "images": [images, images], "ranks": [[1, 2], [1]]}, features=GROUP_FEATURES
    )
    with pytest.raises(ValueError, match=r"groups: row 1 has 2 images and 1 ranks"):
        validate_groups(bad)
    with pytest.raises(ValueError, match=r"groups: row 0 has 2 images and 1 ranks"):
        validate_groups(bad.select([1, 0]))
    many = {"prompt": ["a"] * 10_002, "images": [[{"path": "x.png"}]] * 10_002, "ranks": [[1]] * 10_001 + [[]]}
    with pytest.raises(ValueError, match=r"groups: row 10001 has 1 images and 0 ranks"):  # past the first batch
        validate_groups(Dataset.from_dict(many, features=GROUP_FEATURES))


def test_groups_to_pairs_without_distinct_ranks_raises():
    groups = Dataset.from_dict(
        {
            "prompt": ["a", "b"],
            "images": [[png_bytes("red"), png_bytes("blue")], [png_bytes("red")]],
            "ranks": [[1, 1], [1]],
        },
        features=GROUP_FEATURES,
    )
    with pytest.raises(ValueError, match="no group has two images with distinct ranks.*include_ties=True"):
        groups_to_pairs(groups)
    assert list(groups_to_pairs(groups, include_ties=True)["label"]) == [0.5]


# --------------------------------------------------------------------------------------------------------------
# Entry points, registry, source errors
# --------------------------------------------------------------------------------------------------------------
def test_load_preference_data_dispatches_and_rejects_unknown(tmp_path):
    write_images(tmp_path)
    file = write_json(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "green.png", "rejected": "red.png"}], True)
    pairs = load_preference_data(file, format="pairs")
    assert colors(pairs["chosen"]) == ["green"]
    with pytest.raises(ValueError, match=r"unknown preference-data format 'csv'; known: pickapic"):
        load_preference_data(file, format="csv")


def test_benchmarks_registry_is_consistent():
    assert set(BENCHMARKS) == {"hpdv3", "hpdv2", "imagereward", "pickapic_v2", "genai_bench"}
    for bench in BENCHMARKS.values():
        assert bench.format in FORMATS
        assert bench.schema in {"pairs", "groups"}
        assert "/" in bench.hub_id


def test_load_benchmark_from_local_copy_and_errors(tmp_path):
    write_images(tmp_path / "images")
    write_json(tmp_path / "test.json", [{"prompt": "a", "path1": "images/blue.png", "path2": "images/red.png"}])
    pairs = load_benchmark("hpdv3", path=tmp_path)
    assert colors(pairs["chosen"]) == ["blue"]
    groups_dir = tmp_path / "hpdv2"
    write_json(groups_dir / "test.json", [{"prompt": "a", "image_path": ["../images/red.png"], "rank": [1]}])
    assert load_benchmark("hpdv2", path=groups_dir)["ranks"] == [[1]]

    with pytest.raises(ValueError, match=r"unknown benchmark 'drawbench'; known: hpdv3"):
        load_benchmark("drawbench")
    with pytest.raises(ValueError, match=r"'hpdv3': the Hub copy MizzenAI/HPDv3 keeps its images in archives"):
        load_benchmark("hpdv3")
    only = tmp_path / "only"
    write_json(only / "pairs.jsonl", [{"prompt": "a"}], lines=True)
    with pytest.raises(FileNotFoundError, match=r"no data files for split 'test' in .*only.*pairs\.jsonl"):
        load_benchmark("pickapic_v2", path=only)


def test_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no such file or folder: .*missing\.jsonl"):
        load_pairs(tmp_path / "missing.jsonl")
    empty = Dataset.from_dict({"prompt": [], "path1": [], "path2": []})
    with pytest.raises(ValueError, match="the dataset has no rows"):
        load_hpdv3(empty)
    with pytest.raises(TypeError, match=r"load_dataset arguments \['revision'\] apply to Hub sources only"):
        load_hpdv3(empty, revision="main")
    splits = datasets.DatasetDict({"train": empty, "test": empty})
    with pytest.raises(ValueError, match=r"pass split= as one of \['train', 'test'\]"):
        load_hpdv3(splits)


def test_load_benchmark_from_the_hub_passes_registry_defaults(monkeypatch):
    calls = []
    votes = Dataset.from_dict(
        {
            "prompt": ["p"],
            "left_image": [png_bytes("red")],
            "right_image": [png_bytes("blue")],
            "vote_type": ["rightvote"],
        }
    )

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return votes

    monkeypatch.setattr("modeling_dina.data_reading.load_dataset", fake_load_dataset)
    pairs = load_benchmark("genai_bench")
    assert calls == [("TIGER-Lab/GenAI-Bench", {"split": "test", "name": "image_generation", "data_files": None})]
    assert colors(pairs["chosen"]) == ["blue"]

    load_benchmark("genai_bench", hub_id="me/votes", split="test_v1", name=None)
    assert calls[-1] == ("me/votes", {"split": "test_v1", "name": None, "data_files": None})
