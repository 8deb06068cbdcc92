"""Alignment in the Shapes world: the checker reward, the evaluation's interval, and a short deterministic run of each
method (checker GRPO, DiNa GRPO, DiNa ReFL with the authors' recipe) on the shipped generator and reward."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from modeling_dina.alignment.config import AlignmentConfig
from modeling_dina.cli import main as dina_main
from modeling_dina.shapes.align import (
    checker_reward,
    parse_overrides,
    run_shapes_alignment,
    training_prompts,
    wilson_interval,
)
from modeling_dina.shapes.align_report import check_run, describe, summarise_run, write_alignment_report
from modeling_dina.shapes.data import split_prompts
from modeling_dina.shapes.demo import aligned_lora
from modeling_dina.shapes.generator import load_generator
from modeling_dina.shapes.gradient_snr import VARIANTS, batch_gradients, pairwise_cosines, step_config, summarise
from modeling_dina.shapes.grammar import parse_prompt
from modeling_dina.shapes.render import render_scene, sample_scene

TINY_RUN = dict(
    steps=2,
    batch_size=2,
    group_size=2,
    num_inference_steps=3,
    lora_rank=4,
    lora_alpha=4,
    eval_every=2,
    seed=0,
)


def test_checker_reward_counts_satisfied_attributes_plus_the_verdict():
    rng = np.random.default_rng(0)
    prompt = "two red circles"
    good = render_scene(sample_scene(prompt, rng))
    wrong_colour = render_scene(sample_scene(prompt, rng, ["colour"]))
    assert checker_reward([good, wrong_colour], [prompt, prompt]) == [2.0, pytest.approx(2 / 3)]


def test_wilson_interval_by_hand():
    low, high = wilson_interval(0.5, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    low, high = wilson_interval(0.0, 512)
    assert low == pytest.approx(0.0, abs=1e-12) and 0 < high < 0.01


def test_overrides_are_config_fields_read_as_json():
    assert parse_overrides(["steps=3", "reward_step=[15, 18]", "method=grpo", "ema_decay=null"]) == {
        "steps": 3,
        "reward_step": [15, 18],
        "method": "grpo",
        "ema_decay": None,
    }
    with pytest.raises(ValueError, match="bogus"):
        parse_overrides(["bogus=1"])


def measured_values(record):
    """A log record without its timings and memory (which vary between identical runs)."""
    return {k: v for k, v in record.items() if not k.endswith("_s") and "memory" not in k}


def run(tmp_path, name, reward, **overrides):
    records = run_shapes_alignment(
        tmp_path / name, reward=reward, eval_samples=2, validation_samples=2, **{**TINY_RUN, **overrides}
    )
    lora = tmp_path / name / "lora"
    return records, lora


def test_shapes_checker_grpo_run_is_deterministic_and_moves_only_the_lora(tmp_path):
    records, lora = run(tmp_path, "a", "checker", method="grpo", train_timesteps=2, learning_rate=1e-2)
    assert [r["step"] for r in records] == [0, 1, 2]
    for r in (records[0], records[-1]):
        assert r["eval/compliance_low"] <= r["eval/compliance"] <= r["eval/compliance_high"]
        assert "eval/validation_reward" not in r  # the checker is no differentiable reward: nothing to stop on
    assert all(0 <= r["reward_mean"] <= 2 for r in records[1:])
    assert all(r["ratio_mean"] == 1.0 for r in records[1:])  # one epoch: the stored log-probs are the policy's
    again, _ = run(tmp_path, "b", "checker", method="grpo", train_timesteps=2, learning_rate=1e-2)
    assert list(map(measured_values, again)) == list(map(measured_values, records))
    fresh = load_generator()
    fresh.load_lora_weights(lora)
    moved = [p.abs().sum() > 0 for n, p in fresh.transformer.named_parameters() if "lora_B" in n]
    assert any(moved)  # (the last block's text-stream output is unused: its LoRA gets no gradient)
    # `dina demo --aligned LORA`: the base and the aligned generator on the same prompts and seeds
    out = tmp_path / "demo"
    dina_main(
        [
            "demo",
            "--output",
            str(out),
            "--prompts",
            "2",
            "--candidates",
            "2",
            "--eval-prompts",
            "4",
            "--aligned",
            str(lora),
        ]
    )
    result = json.loads((out / "demo.json").read_text())
    assert result["base"]["prompts"] == result["aligned"]["prompts"] == 4
    assert (out / "contact_sheet.png").is_file() and (out / "contact_sheet_aligned.png").is_file()
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights"):
        aligned_lora(tmp_path)


def test_shapes_dina_grpo_run(tmp_path):
    records, _ = run(tmp_path, "dina", "dina", method="grpo", train_timesteps=2)
    assert [r["step"] for r in records] == [0, 1, 2]
    assert all("eval/validation_reward" in r for r in (records[0], records[-1]))
    assert records[1]["reward_flops"] > 0


def test_shapes_dina_grpo_online_run(tmp_path):
    """The online settings: kinds balanced, batch-std advantages, DiNa refreshed on the very samples GRPO scored
    (2 prompts x 2 per step) at the level it scores at, and the LoRA kept is the one with the best validation-prompt
    compliance."""
    records, _ = run(
        tmp_path,
        "online",
        "dina",
        method="grpo",
        train_timesteps=2,
        refresh_every=1,
        refresh_scored=True,
        refresh_train_steps=2,
        refresh_at_scoring_level=True,
        balanced_prompts=True,
        advantage_std="batch",
        early_stopping_metric="validation_compliance",
        early_stopping_patience=5,
    )
    assert all(r["refresh/from_scored"] == 1.0 and r["refresh/labelled"] == 4 for r in records[1:])
    assert all(r["refresh/fixed_levels"] == 1.0 for r in records[1:])
    assert all(0 <= r["eval/validation_compliance"] <= 1 for r in (records[0], records[-1]))
    assert records[-1]["best_step"] in (0, 2)
    config = json.loads((tmp_path / "online" / "alignment_config.json").read_text())
    assert config["advantage_std"] == "batch" and len(set(config["prompts"])) < len(config["prompts"])


def test_shapes_refl_recipe_run(tmp_path):
    prompts = split_prompts()["train"][:2]
    records, lora = run(
        tmp_path,
        "refl",
        "dina",
        prompts=prompts,
        steps=3,
        eval_every=1,
        reward_step=[1, 2],
        pretrain_weight=1.0,
        pretrain_batch_size=2,
        ema_decay=0.5,
        early_stopping_metric="validation_reward",
        early_stopping_patience=5,
    )
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert all(r["pretrain_loss"] > 0 and r["reward_step"] in (1, 2) for r in records[1:])
    assert all("eval/validation_reward" in r and "eval/compliance" in r for r in records)
    best = max(records, key=lambda r: r["eval/validation_reward"])["step"]
    assert records[-1]["best_step"] == best
    config = json.loads((tmp_path / "refl" / "alignment_config.json").read_text())
    assert config["pretrain_weight"] == 1.0 and config["prompts"] == prompts
    assert (lora / "pytorch_lora_weights.safetensors").is_file()
    saved = [
        (folder / "pytorch_lora_weights.safetensors").read_bytes() for folder in (lora, tmp_path / "refl" / "best")
    ]
    assert saved[0] == saved[1]
    # the report reads the run's log: one row per run, its curve and its reward FLOPs
    text = write_alignment_report(tmp_path, tmp_path / "docs", "the command").read_text()
    assert "| refl |" in text and "the command" in text and (tmp_path / "docs" / "alignment_vs_flops.png").is_file()
    summary = summarise_run(tmp_path / "refl")
    assert [p["step"] for p in summary["curve"]] == [0, 1, 2, 3] and summary["reward_gflop_per_step"] > 0
    assert summary["check"] is None and "not run" in text
    check = check_run(tmp_path / "refl", num_samples=4)  # the base and the final LoRA on fresh held-out draws
    assert check["draws"] == 4 and all(0 <= check[k]["compliance"] <= 1 for k in ("base", "aligned"))
    text = write_alignment_report(tmp_path, tmp_path / "docs", "the command").read_text()
    assert "not run" not in text and summarise_run(tmp_path / "refl")["check"] == check
    assert check["aligned"]["rates"]["overall"] == check["aligned"]["compliance"]
    assert f"(LoRA of step {best})" in text  # early stopping kept that step's LoRA, and the check says so
    breakdown = text[text.index("| run | count prompts | relation prompts |") :]
    assert breakdown.splitlines()[2].startswith("| refl | ") and breakdown.splitlines()[2].count("→") == 6
    assert summary["curve"][-1]["reward_gflop"] == pytest.approx(3 * summary["reward_gflop_per_step"])
    # a run of an earlier build whose folder is not here keeps its row; the runs here are read afresh
    stored = json.loads((tmp_path / "docs" / "alignment.json").read_text())
    earlier = {**stored["refl"], "what": "a run made elsewhere", "steps": 7}
    (tmp_path / "docs" / "alignment.json").write_text(json.dumps({"earlier": earlier, "refl": {}}))
    text = write_alignment_report(tmp_path, tmp_path / "docs", "the command").read_text()
    assert "| earlier | a run made elsewhere | 7 |" in text and text.count("| refl | refl, ") == 1


def test_shapes_refl_with_reward_refresh(tmp_path):
    """`--refresh-every`: the DiNa reward is refitted on checker-labelled policy samples during the run (logged), and
    only DiNa rewards can be refreshed."""
    records, _ = run(tmp_path, "fresh", "dina", steps=2, reward_step=[1, 2], refresh_every=2)
    assert "refresh/pairs" not in records[1] and records[2]["refresh/pairs"] > 0
    assert records[2]["refresh/loss"] > 0
    with pytest.raises(ValueError, match="refresh"):
        run(tmp_path, "fresh-checker", "checker", method="grpo", refresh_every=2)


def test_gradient_snr_cosines_and_summary_by_hand():
    gradients = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    cosines = pairwise_cosines(gradients)
    assert cosines == pytest.approx([1 / 2**0.5, 0.0, 1 / 2**0.5], abs=1e-6)
    summary = summarise([0.2, 0.2, 0.2])
    # a batch of 64 with signal share 0.2: m = (1 - c) / c = 4 batches average to share 0.5
    assert summary["mean_cosine"] == pytest.approx(0.2) and summary["samples_for_0.5"] == pytest.approx(256)
    assert summarise([-0.1, 0.05])["samples_for_0.5"] == float("inf")


def test_gradient_snr_variants_are_one_epoch_grpo_steps():
    for name, _, overrides in VARIANTS:
        config = step_config(overrides)
        assert config.method == "grpo" and config.inner_epochs == 1, name
        assert (config.batch_size, config.group_size, config.num_inference_steps) == (8, 8, 10), name
    assert step_config(VARIANTS[-1][2]).sde_noise_grid == 4


def test_gradient_snr_gradients_are_independent_batches_of_one_step():
    gradients = batch_gradients({"method": "grpo", "sde_steps": 1, "num_inference_steps": 2}, "random", batches=2)
    assert gradients.shape[0] == 2 and torch.isfinite(gradients).all() and gradients.abs().sum() > 0
    assert not torch.equal(gradients[0], gradients[1])


def test_describe_names_a_runs_settings(tmp_path):
    folder = tmp_path / "grpo-dina-x1"
    folder.mkdir()

    def described(config: AlignmentConfig, log: str) -> str:
        (folder / "alignment_config.json").write_text(json.dumps(config.to_dict()))
        (folder / "log.jsonl").write_text(log)
        return describe(folder)

    config = AlignmentConfig(
        method="grpo",
        learning_rate=3e-4,
        batch_size=8,
        group_size=8,
        num_inference_steps=10,
        share_initial_noise=True,
        sde_steps=2,
        sde_noise_grid=4,
        kl_weight=0.04,
    )
    assert described(config, '{"step": 1}\n{"step": 5, "refresh/pairs": 64}\n') == (
        "grpo, lr 0.0003, 8 prompts, group 8, shared starts, SDE on 2 of 10 steps, SDE noise on a 4x4 lattice, "
        "KL weight 0.04, DiNa-LRM refreshed every 5 steps"
    )
    online = dataclasses.replace(
        config,
        prompts=training_prompts(balanced=True),
        kl_weight=0.0,
        advantage_std="batch",
        train_unconditional=False,
        early_stopping_metric="validation_compliance",
        eval_every=10,
    )
    assert described(online, '{"step": 5, "refresh/pairs": 64, "refresh/from_scored": 1.0}\n') == (
        "grpo, lr 0.0003, 8 prompts (kinds balanced), group 8, shared starts, SDE on 2 of 10 steps, SDE noise on a "
        "4x4 lattice, batch-std advantages, no gradient through the unconditional branch, DiNa-LRM refreshed every "
        "5 steps on its scored samples, LoRA kept: the best validation compliance"
    )
    level = '{"step": 5, "refresh/pairs": 64, "refresh/from_scored": 1.0, "refresh/fixed_levels": 1.0}\n'
    assert described(online, level).endswith(
        "DiNa-LRM refreshed every 5 steps on its scored samples at the scoring noise level, LoRA kept: the best "
        "validation compliance"
    )


def test_balanced_training_prompts_weigh_both_kinds_equally():
    """The train split holds far more relation than count prompts; balanced, a uniform draw picks each kind half the
    time, every train prompt is kept and no other prompt enters."""
    train = split_prompts()["train"]
    balanced = training_prompts(balanced=True)
    kinds = [parse_prompt(p).kind for p in balanced]
    assert training_prompts() == train and set(balanced) == set(train)
    assert (
        kinds.count("count")
        == kinds.count("relation")
        == max(sum(parse_prompt(p).kind == k for p in train) for k in ("count", "relation"))
    )


def test_describe_names_how_far_a_refl_gradient_reaches(tmp_path):
    folder = tmp_path / "refl-dina-x1"
    folder.mkdir()
    (folder / "log.jsonl").write_text('{"step": 1}\n')
    recipe = AlignmentConfig(method="refl", reward_step=[14, 18], grad_steps=1, pretrain_weight=1.0, ema_decay=0.9)
    draft = dataclasses.replace(recipe, num_inference_steps=10, reward_step=-1, grad_steps=None, ema_decay=None)
    described = []
    for config in (recipe, draft):
        (folder / "alignment_config.json").write_text(json.dumps(config.to_dict()))
        described.append(describe(folder))
    assert described[0] == (
        "refl, lr 0.0001, 4 prompts, u = 0.4, pretrain weight 1, reward of the x0 prediction of step [14, 18] of 20, "
        "gradient through the last 1 model evaluation, policy EMA 0.9"
    )
    assert described[1].endswith("reward of the final sample, gradient through all 10 sampling steps")
    layout = dataclasses.replace(draft, policy_grad_steps=4)
    (folder / "alignment_config.json").write_text(json.dumps(layout.to_dict()))
    (folder / "log.jsonl").write_text('{"step": 5, "refresh/pairs": 64, "refresh/adversarial_ties": 0.9}\n')
    assert describe(folder).endswith(
        "gradient through all 10 sampling steps, the LoRA trained at the first 4 of them only, DiNa-LRM refreshed "
        "every 5 steps with adversarial ties"
    )


def test_reward_ascent_pushes_the_latent_through_the_rest_of_the_sampler():
    from modeling_dina.shapes.reward_ascent import ascend

    for from_step in (10, 8):
        records = ascend(from_step, num_prompts=4, iterations=1, step_size=0.5)
        assert [r["iteration"] for r in records] == [0, 1]
        assert all(0 <= r["compliance"] <= 1 and math.isfinite(r["reward"]) for r in records)
        assert records[1]["reward"] != records[0]["reward"]
