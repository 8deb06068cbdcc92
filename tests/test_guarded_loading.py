"""Hostile or broken model folders are refused at load with an error naming the key, before anything is allocated
(issue 16, items 5 and 8)."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from modeling_dina import DiNaConfig, DiNaRewardModel, modeling_loading
from modeling_dina import modeling_dina as modeling


@pytest.fixture
def folder(tiny_dina_dir, tmp_path):
    """A private copy of the tiny model folder."""
    return str(shutil.copytree(tiny_dina_dir, tmp_path / "model"))


@pytest.fixture
def merged_folder(tiny_dina_dir, tmp_path):
    """A self-contained (base weights included) copy of the tiny model."""
    path = tmp_path / "merged"
    DiNaRewardModel.from_pretrained(tiny_dina_dir).save_pretrained(path, merged=True)
    return str(path)


def edit_config(folder: str, **changes) -> None:
    path = f"{folder}/config.json"
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


def edit_weights(folder: str, edit) -> str:
    """Apply `edit` to the first head tensor, keeping the file's metadata (its save id); returns the key."""
    path = f"{folder}/model.safetensors"
    state = load_file(path)
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    key = sorted(k for k in state if k.startswith("reward_head."))[0]
    state[key] = edit(state[key])
    save_file(state, path, metadata=metadata)
    return key


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"lora_rank": 4.5}, "'lora_rank' expected int, got float"),
        ({"score_offset": "10"}, "'score_offset' with value '10'"),
        ({"score_scale": float("nan")}, "`score_scale` must be a finite number"),
        ({"lora_alpha": -8}, "`lora_alpha` must be > 0"),
        ({"head_width": 10**7}, "`head_width` is 10000000"),
    ],
)
def test_loose_config_values_are_refused_naming_the_key(folder, changes, message):
    edit_config(folder, **changes)
    with pytest.raises(ValueError, match=message):
        DiNaRewardModel.from_pretrained(folder)


@pytest.mark.parametrize("layers", [1e9, 10**9])
def test_a_billion_layers_is_refused_before_building(merged_folder, layers, monkeypatch):
    def no_building(*args, **kwargs):
        raise AssertionError("a module was built from a hostile config")

    monkeypatch.setattr(modeling, "build_backbone", no_building)
    config = json.load(open(f"{merged_folder}/config.json"))
    edit_config(
        merged_folder, num_backbone_layers=layers, backbone_config={**config["backbone_config"], "num_layers": 10**9}
    )
    with pytest.raises(ValueError, match="num_backbone_layers"):
        DiNaRewardModel.from_pretrained(merged_folder)


def test_sizes_are_checked_against_the_file_header_before_reading_weights(merged_folder, monkeypatch):
    def no_reading(*args, **kwargs):
        raise AssertionError("weights were read before the header was checked")

    monkeypatch.setattr(modeling_loading, "load_file", no_reading)
    edit_config(merged_folder, head_num_queries=4000)  # within bounds, not what the file holds
    with pytest.raises(ValueError, match=r"key 'reward_head\..*' has shape .* the model expects"):
        DiNaRewardModel.from_pretrained(merged_folder)
    edit_config(merged_folder, head_num_queries=4, num_backbone_layers=1, visual_layers=[1], text_layers=[1])
    with pytest.raises(KeyError, match=r"unexpected keys \['backbone.transformer_blocks.1"):
        DiNaRewardModel.from_pretrained(merged_folder)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_and_bool_weights_are_refused_not_cast(folder, dtype):
    key = edit_weights(folder, lambda t: t.to(dtype))
    with pytest.raises(ValueError, match=f"weights must be floating point.*{key}"):
        DiNaRewardModel.from_pretrained(folder)


def test_nan_weights_are_refused(folder):
    key = edit_weights(folder, lambda t: t.clone().fill_(float("nan")))
    with pytest.raises(ValueError, match=f"{key}.*NaN or infinite"):
        DiNaRewardModel.from_pretrained(folder)


def test_a_sound_folder_still_loads(folder, merged_folder):
    model = DiNaRewardModel.from_pretrained(folder)
    assert isinstance(model.config, DiNaConfig) and not model.config.base_weights_included
    assert DiNaRewardModel.from_pretrained(merged_folder).config.base_weights_included
