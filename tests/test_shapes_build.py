"""The Shapes build, run end to end with tiny step counts: every stage writes what the next one and the package read;
and the on-policy pairs the rewards are trained on."""

import json

import pytest
from PIL import Image

from modeling_dina import DiNaRewardPipeline
from modeling_dina.shapes.build import main as build_main
from modeling_dina.shapes.data import PAIR_FEATURES, make_generated_pairs
from modeling_dina.shapes.generator import GENERATOR_DIR, load_generator
from modeling_dina.shapes.grammar import CheckResult
from modeling_dina.shapes.report import build_rewards
from modeling_dina.shapes.reward import VARIANTS


def _verdict(violations: set[str]) -> CheckResult:
    return CheckResult(**{a: a not in violations for a in ("colour", "shape", "count")}, position=None)


def test_generated_pairs_prefer_fewer_violations():
    prompts = ["two red circles"] * 3 + ["a blue square"] * 2
    images = [Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(5)]
    verdicts = [_verdict(set()), _verdict({"count"}), _verdict({"count", "colour"}), _verdict(set()), _verdict(set())]
    pairs = make_generated_pairs(prompts, images, verdicts)
    assert pairs.features == PAIR_FEATURES
    # Within "two red circles": 0 < 1, 0 < 2, 1 < 2 violations; the two complying squares tie and are not paired.
    chosen_rejected = sorted(
        (c.getpixel((0, 0))[0], r.getpixel((0, 0))[0]) for c, r in zip(pairs["chosen"], pairs["rejected"])
    )
    assert chosen_rejected == [(0, 1), (0, 2), (1, 2)]
    assert set(pairs["prompt"]) == {"two red circles"} and set(pairs["kind"]) == {"generated"}
    assert sorted(map(tuple, pairs["violations"])) == [("colour", "count"), ("colour", "count"), ("count",)]
    assert len(make_generated_pairs(prompts, images, verdicts, num_pairs=2, seed=1)) == 2
    assert len(make_generated_pairs(prompts, images, verdicts, num_pairs=10)) == 3
    with pytest.raises(ValueError, match="one image and one verdict per prompt"):
        make_generated_pairs(prompts, images[:4], verdicts)


def test_generator_stage_writes_a_loadable_pipeline(tmp_path):
    build_main(
        ["--stage", "generator", "--output", str(tmp_path), "--vae-steps", "2", "--transformer-steps", "2"]
        + ["--eval-samples", "4"]
    )
    metrics = json.loads((tmp_path / "generator_metrics.json").read_text())
    assert metrics["vae"]["steps"] == 2 and metrics["transformer"]["steps"] == 2
    assert set(metrics["compliance_test_prompts"]) == {"random", "best_of_4"}
    assert load_generator(path=tmp_path / "generator").transformer.config.num_layers == 4


@pytest.mark.parametrize("candidates", [2, 0], ids=["on-policy", "rendered-only"])
def test_rewards_stage_writes_models_and_report(tmp_path, candidates):
    results = build_rewards(
        tmp_path,
        generator_dir=GENERATOR_DIR,
        train_pairs=16,
        test_pairs=8,
        generated_candidates=candidates,
        reward_steps=2,
        eval_prompts=4,
        best_of=2,
    )
    pair_sets = ["rendered", "generated"] if candidates else ["rendered"]
    assert results["train_pairs"]["rendered"] == 16 and (results["train_pairs"]["generated"] > 0) == bool(candidates)
    assert results["test_pairs"] == dict.fromkeys(pair_sets, 8)
    assert list(results["accuracy"]) == pair_sets
    assert all(set(results["accuracy"][name]) == {*VARIANTS, "pixel"} for name in pair_sets)
    independent = results["accuracy_independent_noise"]
    assert list(independent) == pair_sets and all(set(independent[name]) == set(VARIANTS) for name in pair_sets)
    assert set(independent["rendered"]["dina"]) == set(results["accuracy"]["rendered"]["dina"])
    assert {"random", "oracle", "dina", "dina_ensemble", "pixel"} <= set(results["best_of_n"])
    report = (tmp_path / "report" / "report.md").read_text()
    assert all(report.count(f"### {name} test pairs (8)") == 2 for name in pair_sets) and "| dina |" in report
    assert "## Held-out pairwise accuracy with independent noise (%)" in report
    for plot in ("accuracy_vs_noise.png", "best_of_n.png"):
        assert Image.open(tmp_path / "report" / plot).size[0] > 100
    reward = DiNaRewardPipeline.from_pretrained(tmp_path / "rewards" / "dina")
    assert reward.reward_model.config.num_backbone_layers == 2
