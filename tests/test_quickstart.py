"""The offline training quickstart (README "Train on your own pairs"), end to end on a reduced budget: Shapes pairs
written as PNG + JSONL, `dina cache`, `dina train --config hub_configs/train_quickstart.yaml`, `dina eval`."""

import json
from pathlib import Path

import datasets
import pytest
import yaml
from PIL import Image

from modeling_dina import DiNaRewardPipeline
from modeling_dina.cli import main as dina_main
from modeling_dina.shapes.export_pairs import main as export_main
from modeling_dina.shapes.generator import GENERATOR_DIR

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "hub_configs" / "train_quickstart.yaml"


@pytest.fixture(autouse=True)
def _quiet_datasets(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    datasets.disable_progress_bars()


def test_export_pairs_writes_images_and_jsonl(tmp_path):
    paths = export_main([str(tmp_path), "--num", "6", "--test", "3"])
    lines = {split: [json.loads(line) for line in path.read_text().splitlines()] for split, path in paths.items()}
    assert [len(lines["train"]), len(lines["test"])] == [6, 3]
    assert {row["prompt"] for row in lines["train"]}.isdisjoint(row["prompt"] for row in lines["test"])
    row = lines["train"][0]
    assert set(row) == {"prompt", "chosen", "rejected", "label"} and row["label"] in (0.5, 1.0)
    assert Image.open(tmp_path / row["chosen"]).size == (64, 64) and not list(tmp_path.glob("*.tmp"))


def test_quickstart_end_to_end(tmp_path, capsys):
    config = yaml.safe_load(CONFIG.read_text())
    assert (REPO / config["model"]["base"]).resolve() == Path(GENERATOR_DIR).resolve()
    export_main([str(tmp_path / "pairs"), "--num", "24", "--test", "8"])
    cache = tmp_path / "cache"
    dina_main(
        ["cache", str(tmp_path / "pairs" / "train.jsonl"), "--format", "pairs", "--base", str(GENERATOR_DIR)]
        + ["--output", str(cache), "--max-sequence-length", str(config["model"]["config"]["max_sequence_length"])]
    )
    # The shipped config with a small budget and this test's folders.
    config["model"]["base"] = str(GENERATOR_DIR)
    config["data"]["train"]["cached"] = str(cache)
    config["training"].update(output_dir=str(tmp_path / "model"), max_steps=3, warmup_steps=1, logging_steps=1)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    dina_main(["train", "--config", str(tmp_path / "config.yaml")])
    reward = DiNaRewardPipeline.from_pretrained(tmp_path / "model")
    assert reward.reward_model.config.num_backbone_layers == 2
    out = tmp_path / "eval"
    dina_main(
        ["eval", "--model", str(tmp_path / "model"), "--benchmark", "pairs"]
        + ["--path", str(tmp_path / "pairs" / "test.jsonl"), "--noise-levels", "0.2", "--ensemble"]
        + ["--bootstrap", "0", "--output", str(out)]
    )
    results = json.loads((out / "results.json").read_text())
    assert results["n_items"] == 8 and set(results["scorers"]) == {"dina@0.2", "dina@ensemble"}
    assert "| dina@0.2 |" in capsys.readouterr().out
