"""Tests for modeling_dina.training: learning, the shared-noise objective, losses and ties, EMA, exact resume,
two-process equivalence, batching, gradient checkpointing, what a Hub push uploads, and the CLI."""

import argparse
import io
import json
import os
import random
import runpy
import subprocess
import sys
import textwrap

import datasets
import pytest
import torch
import transformers
from datasets import Dataset, Features, Image, Value
from huggingface_hub import ModelCard
from PIL import Image as PILImage
from PIL import ImageDraw
from safetensors.torch import load_file
from transformers import TrainerCallback

from modeling_dina import DiNaConfig, DiNaRewardModel
from modeling_dina.losses import LOSS_TYPES, preference_loss
from modeling_dina.training import (
    BucketSampler,
    CachedPreferenceDataset,
    DiNaTrainer,
    DiNaTrainingArguments,
    PreferenceCollator,
    cache_preference_dataset,
    files_to_upload,
    load_cached_preferences,
    prepare_upload_folder,
)
from modeling_dina.training.cli import add_train_parser, load_config, run_train
from modeling_dina.training.hub import TRAINER_IGNORE_PATTERNS

PAIR_FEATURES = Features({"prompt": Value("string"), "chosen": Image(), "rejected": Image(), "label": Value("float32")})
COLOURS = {"red": (220, 40, 40), "blue": (40, 40, 220)}
NOUNS = ["circle", "square", "triangle", "cat", "dog", "car", "tree", "house"]
TINY = {
    "num_backbone_layers": 2,
    "visual_layers": [1, 2],
    "text_layers": [1, 2],
    "lora_rank": 4,
    "lora_alpha": 8,
    "head_num_attention_heads": 2,
}


@pytest.fixture(autouse=True)
def _quiet(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()


def render(colour: str, rng: random.Random, size=(32, 32)) -> bytes:
    """A grey image with one red or blue disc or box at a random place."""
    image = PILImage.new("RGB", size, (128, 128, 128))
    r = rng.randint(5, 8)
    x, y = rng.randint(r, size[0] - r), rng.randint(r, size[1] - r)
    draw = ImageDraw.Draw(image)
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x - r, y - r, x + r, y + r], fill=COLOURS[colour])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_pairs(n: int, seed: int, sizes=((32, 32),), ties=()) -> Dataset:
    """Red (chosen) vs blue (rejected) pairs with prompts of a few words; rows in `ties` are labelled 0.5."""
    rng = random.Random(seed)
    rows = {"prompt": [], "chosen": [], "rejected": [], "label": []}
    for i in range(n):
        size = sizes[i % len(sizes)]
        rows["prompt"].append(f"a {rng.choice(['small', 'large'])} {rng.choice(NOUNS)}")
        rows["chosen"].append({"bytes": render("red", rng, size), "path": None})
        rows["rejected"].append({"bytes": render("blue", rng, size), "path": None})
        rows["label"].append(0.5 if i in ties else 1.0)
    return Dataset.from_dict(rows, features=PAIR_FEATURES)


def cache(pairs: Dataset, base: str, folder) -> CachedPreferenceDataset:
    return cache_preference_dataset(pairs, base, folder, max_sequence_length=8, resolution=32, progress=False)


def swapped(dataset: CachedPreferenceDataset) -> CachedPreferenceDataset:
    """The same pairs with chosen and rejected exchanged."""
    names = {"chosen_latents": "rejected_latents", "rejected_latents": "chosen_latents"}
    return CachedPreferenceDataset(dataset.pairs.rename_columns(names), dataset.prompts, dataset.latent_channels)


def tiny_model(base: str, seed: int = 0) -> DiNaRewardModel:
    torch.manual_seed(seed)
    return DiNaRewardModel.from_base(base, **TINY)


def training_args(output_dir, **kwargs) -> DiNaTrainingArguments:
    defaults = {
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "use_cpu": True,
        "eval_noise_levels": [0.2, 0.5],
    }
    return DiNaTrainingArguments(output_dir=str(output_dir), **{**defaults, **kwargs})


def trainable(model: DiNaRewardModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}


@pytest.fixture(scope="module")
def train_cache_dir(tiny_sd3_dir, tmp_path_factory) -> str:
    """A cache of 16 pairs in two latent sizes (12 square, 4 landscape), row 3 a tie."""
    folder = tmp_path_factory.mktemp("cache")
    cache(make_pairs(16, 0, sizes=((32, 32),) * 3 + ((32, 24),), ties=(3,)), tiny_sd3_dir, folder)
    return str(folder)


@pytest.fixture(scope="module")
def train_set(train_cache_dir) -> CachedPreferenceDataset:
    return load_cached_preferences(train_cache_dir)


# ---------------------------------------------------------------------------------------------- learning


def test_held_out_accuracy_rises_well_above_chance(tiny_sd3_dir, tmp_path):
    train = cache(make_pairs(32, 1), tiny_sd3_dir, tmp_path / "train")
    test = cache(make_pairs(24, 2), tiny_sd3_dir, tmp_path / "test")
    args = training_args(tmp_path / "out", per_device_train_batch_size=8, per_device_eval_batch_size=24, max_steps=15)
    args.learning_rate = 3e-3
    trainer = DiNaTrainer(tiny_model(tiny_sd3_dir), args, train_dataset=train, eval_dataset=test)
    before = trainer.evaluate()
    if before["eval_accuracy_ensemble"] > 0.5:
        # The untrained model happens to prefer red: teach it the opposite, so learning has to overturn it.
        trainer.train_dataset, trainer.eval_dataset = swapped(train), swapped(test)
        before = trainer.evaluate()
    assert set(before) >= {"eval_loss", "eval_accuracy_u0.2", "eval_accuracy_u0.5", "eval_accuracy_ensemble"}
    assert before["eval_accuracy_ensemble"] <= 0.5

    trainer.train()
    after = trainer.evaluate()
    assert after["eval_accuracy_ensemble"] >= 0.9, (before, after)
    assert after["eval_accuracy_u0.2"] >= 0.9 and after["eval_loss"] < before["eval_loss"]


# ---------------------------------------------------------------------------------------------- objective


def test_pair_shares_noise_level_and_noise_in_one_forward(tiny_sd3_dir, train_set, tmp_path):
    model = tiny_model(tiny_sd3_dir)
    seen, batches = [], []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs), with_kwargs=True)
    collator = PreferenceCollator()

    def spy_collator(examples):
        batches.append(collator(examples))
        return batches[-1]

    args = training_args(tmp_path, max_steps=2)
    DiNaTrainer(model, args, train_dataset=train_set, data_collator=spy_collator).train()

    grid = model.noise_grid
    assert len(seen) == 2  # one forward per step: chosen and rejected batched together
    for kwargs, batch in zip(seen, batches):
        latents, timestep = kwargs["latents"], kwargs["timestep"]
        b = len(batch["labels"])
        assert latents.shape == (2 * b, *batch["chosen_latents"].shape[1:])
        torch.testing.assert_close(timestep[:b], timestep[b:], rtol=0, atol=0)
        assert len(set(timestep[:b].tolist())) > 1  # a level per pair, not per batch
        assert all(t in grid.timesteps.tolist() for t in timestep.tolist())
        sigma = grid.sigmas[[grid.timesteps.tolist().index(t) for t in timestep[:b].tolist()]].view(-1, 1, 1, 1)
        noise_chosen = (latents[:b] - (1 - sigma) * batch["chosen_latents"]) / sigma
        noise_rejected = (latents[b:] - (1 - sigma) * batch["rejected_latents"]) / sigma
        torch.testing.assert_close(noise_chosen, noise_rejected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(kwargs["encoder_hidden_states"][:b], kwargs["encoder_hidden_states"][b:])


@pytest.mark.parametrize(
    "overrides",
    [{"loss_type": t} for t in LOSS_TYPES]
    + [{"loss_form": "nll"}, {"noise_sampling": "logit_normal"}, {"noise_sampling": "power", "power_exponent": 3.0}],
    ids=lambda o: "-".join(map(str, o.values())),
)
def test_each_loss_kind_trains(tiny_sd3_dir, train_set, tmp_path, overrides):
    model = tiny_model(tiny_sd3_dir)
    start = trainable(model)
    trainer = DiNaTrainer(model, training_args(tmp_path, max_steps=2, **overrides), train_dataset=train_set)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert any(not torch.equal(start[k], v) for k, v in trainable(model).items())
    for name, value in overrides.items():  # the arguments say how it trains; the model config holds none of it
        assert trainer.knobs[name] == value and name not in model.config.to_dict()
    assert model.config.variance_scale == 2.0 and trainer.eval_noise_levels == [0.2, 0.5]


def test_ties_and_soft_labels_reach_the_loss(tiny_sd3_dir, train_set, tmp_path):
    model = tiny_model(tiny_sd3_dir)
    trainer = DiNaTrainer(model, training_args(tmp_path, loss_type="thurstone"), train_dataset=train_set)
    square = [i for i, size in enumerate(train_set.bucket_ids) if size == (16, 16)][:4]
    batch = trainer._prepare_inputs(PreferenceCollator()([train_set[i] for i in square]))
    for labels in ([1.0, 1.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5], [1.0, 0.5, 0.7, 0.0]):
        batch["labels"] = torch.tensor(labels)
        torch.manual_seed(0)
        loss, out = trainer.compute_loss(model, batch, return_outputs=True)
        expected = preference_loss(
            "thurstone", out["rewards_chosen"], out["rewards_rejected"], out["sigma"], torch.tensor(labels)
        )
        torch.testing.assert_close(loss, expected)
    trainer._train_stats = None
    rewards, sigma = torch.tensor([[1.0, 2.0], [0.0, 3.0]]), torch.tensor([0.1, 0.9])
    trainer._accumulate_train_stats(rewards, sigma, torch.tensor([0.5, 0.5]))  # ties: rewards count, accuracy not
    trainer._accumulate_train_stats(rewards, sigma, torch.tensor([1.0, 1.0]))
    logs = {"loss": 0.0}
    trainer.log(logs)
    assert logs["accuracy"] == 0.5 and logs["rewards/chosen"] == 1.5 and logs["rewards/margin"] == 0.0
    assert logs["accuracy/sigma_0.00-0.25"] == 1.0 and logs["accuracy/sigma_0.75-1.00"] == 0.0


# ---------------------------------------------------------------------------------------------- EMA, resume


class Recorder(TrainerCallback):
    def __init__(self):
        self.trajectory = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.trajectory.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})


def test_ema_tracks_weights_and_is_what_gets_saved(tiny_sd3_dir, train_set, tmp_path):
    model = tiny_model(tiny_sd3_dir)
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    recorder = Recorder()
    args = training_args(tmp_path / "out", max_steps=4, ema_decay=0.6, eval_strategy="steps", eval_steps=4)
    trainer = DiNaTrainer(model, args, train_dataset=train_set, eval_dataset=train_set, callbacks=[recorder])
    trainer.train()

    expected = {n: p.clone() for n, p in initial.items()}
    for step, weights in enumerate(recorder.trajectory, start=1):
        decay = min(0.6, (1 + step) / (10 + step))
        expected = {n: decay * expected[n] + (1 - decay) * weights[n] for n in expected}
    for name, value in expected.items():
        torch.testing.assert_close(trainer.ema.shadow[name], value)
    raw = recorder.trajectory[-1]
    assert all(torch.equal(p, raw[n]) for n, p in model.named_parameters() if p.requires_grad)  # swap undone

    trainer.save_model(str(tmp_path / "final"))
    loaded = DiNaRewardModel.from_pretrained(tmp_path / "final", base_model=tiny_sd3_dir)
    for name, param in loaded.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param, expected[name])
    with trainer.ema.applied(model):
        ema_metrics = trainer.evaluate()
    assert trainer.evaluate()["eval_loss"] == ema_metrics["eval_loss"]  # evaluation already uses the EMA weights


def test_interrupted_run_resumes_exactly(tiny_sd3_dir, train_set, tmp_path):
    def args(out):
        # 16 pairs / 4 = 4 steps an epoch: the checkpoint at step 3 is mid-epoch (data skipping + RNG restore).
        return training_args(out, max_steps=6, save_strategy="steps", save_steps=3, ema_decay=0.8)

    class StopAt3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 3

    full = DiNaTrainer(tiny_model(tiny_sd3_dir), args(tmp_path / "full"), train_dataset=train_set)
    full.train()
    DiNaTrainer(
        tiny_model(tiny_sd3_dir), args(tmp_path / "cut"), train_dataset=train_set, callbacks=[StopAt3()]
    ).train()
    checkpoint = tmp_path / "cut" / "checkpoint-3"
    assert sorted(os.listdir(tmp_path / "cut")) == ["checkpoint-3"]
    files = set(os.listdir(checkpoint))
    assert {"model.safetensors", "ema.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"} <= files
    saved = load_file(checkpoint / "model.safetensors")
    assert set(saved) == set(full.model.trainable_state_dict())  # LoRA + head only, never the frozen base

    resumed = DiNaTrainer(tiny_model(tiny_sd3_dir, seed=1), args(tmp_path / "cut"), train_dataset=train_set)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    expected, got = trainable(full.model), trainable(resumed.model)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert all(torch.equal(full.ema.shadow[k], v) for k, v in resumed.ema.shadow.items())
    assert resumed.ema.num_updates == full.ema.num_updates == 6
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (full, resumed)]
    assert losses[0] == losses[1]

    with pytest.raises(FileNotFoundError, match="not a DiNaTrainer checkpoint"):
        resumed._load_from_checkpoint(str(tmp_path))


DDP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from safetensors.torch import save_file
    from modeling_dina import DiNaConfig, DiNaRewardModel
    from modeling_dina.training import DiNaTrainer, DiNaTrainingArguments, load_cached_preferences

    base, cache, out, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    torch.manual_seed(0)
    model = DiNaRewardModel.from_base(base, **json.loads(sys.argv[5]))
    start = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    args = DiNaTrainingArguments(
        output_dir=out, per_device_train_batch_size=batch, max_steps=3, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, use_cpu=True, optim="sgd", learning_rate=0.5,
    )
    trainer = DiNaTrainer(model, args, train_dataset=load_cached_preferences(cache))
    trainer.train()
    if trainer.is_world_process_zero():
        state = {k: v.contiguous() for k, v in model.trainable_state_dict().items()}
        save_file({**state, **{"start." + k: v for k, v in start.items()}}, os.path.join(out, "weights.safetensors"))
        logs = [h for h in trainer.state.log_history if "loss" in h]
        json.dump({"world_size": args.world_size, "logs": logs}, open(os.path.join(out, "result.json"), "w"))
    trainer.end()  # destroys the process group before exiting
    # gloo's threads can abort the interpreter's teardown ("terminate called without an active exception") after
    # everything is written; leave without it so the launcher sees the run's real outcome.
    if "LOCAL_RANK" in os.environ:  # only under torchrun: the one-process baseline runs inside pytest
        sys.stdout.flush()
        os._exit(0)
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is unavailable")
def test_two_processes_match_one_with_the_same_global_batch(tiny_sd3_dir, train_cache_dir, tmp_path, monkeypatch):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    common = [tiny_sd3_dir, train_cache_dir]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    launched = subprocess.Popen(
        [*command, *common, str(tmp_path / "two"), "2", json.dumps(TINY)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    monkeypatch.setattr(sys, "argv", ["ddp_train.py", *common, str(tmp_path / "one"), "4", json.dumps(TINY)])
    runpy.run_path(str(script), run_name="__main__")  # the single-process reference, meanwhile, in this process
    output, _ = launched.communicate(timeout=300)
    assert launched.returncode == 0, output[-3000:]

    results = {n: json.loads((tmp_path / n / "result.json").read_text()) for n in ("one", "two")}
    assert results["one"]["world_size"] == 1 and results["two"]["world_size"] == 2
    for a, b in zip(results["one"]["logs"], results["two"]["logs"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["accuracy"] == b["accuracy"]
    one, two = (load_file(tmp_path / n / "weights.safetensors") for n in ("one", "two"))
    moved = max((one[k] - one[f"start.{k}"]).abs().max().item() for k in one if not k.startswith("start."))
    assert moved > 1e-3
    for key in one:
        torch.testing.assert_close(one[key], two[key], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- batching


def test_bucket_sampler_batches_one_size_whatever_the_split():
    buckets = ["a"] * 7 + ["b"] * 3
    sampler = BucketSampler(buckets, chunk_size=4, seed=0)
    order = list(sampler)
    assert len(order) == len(sampler) == 12  # each bucket filled up to whole chunks with its own pairs
    assert set(order) == set(range(10))
    chunks = [order[i : i + 4] for i in range(0, 12, 4)]
    assert all(len({buckets[i] for i in chunk}) == 1 for chunk in chunks)
    assert list(BucketSampler(buckets, chunk_size=4, seed=0)) == order  # deterministic
    sampler.set_epoch(1)
    assert list(sampler) != order
    with pytest.raises(ValueError, match="mixes latent sizes"):
        PreferenceCollator()(
            [
                {"chosen_latents": torch.zeros(4, 8, 8), "rejected_latents": torch.zeros(4, 8, 8)},
                {"chosen_latents": torch.zeros(4, 6, 8), "rejected_latents": torch.zeros(4, 6, 8)},
            ]
        )


def test_trainer_batches_by_latent_size(tiny_sd3_dir, train_set, tmp_path):
    trainer = DiNaTrainer(tiny_model(tiny_sd3_dir), training_args(tmp_path), train_dataset=train_set)
    shapes = [tuple(batch["chosen_latents"].shape) for batch in trainer.get_train_dataloader()]
    assert sorted(shapes) == [(4, 4, 12, 16)] + [(4, 4, 16, 16)] * 3
    eval_batches = list(trainer.get_eval_dataloader(train_set).batch_sampler)  # batch 8: 4 landscape, 8 + 4 square
    assert [len(b) for b in eval_batches] == [4, 8, 4]
    assert all(len({train_set.bucket_ids[i] for i in b}) == 1 for b in eval_batches)


def test_arguments_are_validated(tmp_path):
    with pytest.raises(ValueError, match="unknown `loss_type`"):
        training_args(tmp_path, loss_type="hinge")
    with pytest.raises(ValueError, match="remove_unused_columns"):
        training_args(tmp_path, remove_unused_columns=True)
    with pytest.raises(ValueError, match="eval_noise_levels"):
        training_args(tmp_path, eval_noise_levels=[1.5])
    with pytest.raises(ValueError, match="ema_decay"):
        training_args(tmp_path, ema_decay=1.0)


@pytest.mark.parametrize("enable", ["activation_checkpointing_enable", "gradient_checkpointing_enable"])
def test_gradient_checkpointing_keeps_gradients(tiny_sd3_dir, train_set, enable):
    model = tiny_model(tiny_sd3_dir).train()
    batch = PreferenceCollator()([train_set[i] for i in range(2)])
    inputs = (batch["chosen_latents"], torch.full((2,), 400.0), batch["prompt_embeds"], batch["pooled_prompt_embeds"])

    def grads():
        model.zero_grad()
        model(*inputs).rewards.sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain = grads()
    if enable == "gradient_checkpointing_enable":  # the transformers v4 name, a deprecated alias in v5
        with pytest.warns(FutureWarning):
            model.gradient_checkpointing_enable()
    else:
        model.activation_checkpointing_enable()
    assert model.backbone.gradient_checkpointing
    calls = []
    checkpoint = model.backbone._gradient_checkpointing_func
    model.backbone._gradient_checkpointing_func = lambda *a, **k: calls.append(1) or checkpoint(*a, **k)
    checkpointed = grads()
    assert len(calls) == TINY["num_backbone_layers"]
    assert all(plain[n].abs().sum() > 0 for n in plain if "lora_B" in n)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name])


# ---------------------------------------------------------------------------------------------- sharing, CLI


def test_push_uploads_lora_head_config_and_card(tiny_sd3_dir, train_set, tmp_path):
    args = training_args(tmp_path / "out", max_steps=1, eval_strategy="steps", eval_steps=1)
    trainer = DiNaTrainer(tiny_model(tiny_sd3_dir), args, train_dataset=train_set, eval_dataset=train_set)
    trainer.train()
    trainer.save_model()
    trainer.create_model_card(model_name="me/dina-tiny", dataset="me/pairs", eval_dataset="me/held-out")
    backbones = ["backbones.py", *(f"backbone_{name}.py" for name in ("base", "flux", "qwenimage", "sd3", "zimage"))]
    code = [*backbones, "configuration_dina.py", "losses.py", "modeling_dina.py", "noise.py", "reward_head.py"]
    code += ["modeling_loading.py", "safe_files.py"]
    saved = ["config.json", "model.safetensors", "save_manifest.json"]
    expected = sorted(["README.md", *saved, "training_args.bin", *code])
    assert files_to_upload(tmp_path / "out", TRAINER_IGNORE_PATTERNS) == expected

    card = ModelCard.load(tmp_path / "out" / "README.md").data
    assert card.base_model == tiny_sd3_dir and card.datasets == ["me/pairs"] and "reward-model" in card.tags
    assert card.base_model_relation == "adapter" and card.library_name == "transformers"
    assert card.pipeline_tag == "zero-shot-image-classification"
    metrics = {r.metric_name: r.metric_value for r in card.eval_results}
    assert set(metrics) == {"eval_accuracy_u0.2", "eval_accuracy_u0.5", "eval_accuracy_ensemble"}
    assert {r.dataset_name for r in card.eval_results} == {"me/held-out"}
    assert metrics["eval_accuracy_ensemble"] == trainer.state.log_history[-2]["eval_accuracy_ensemble"]

    folder = prepare_upload_folder(trainer.model, tmp_path / "upload", repo_id="me/dina-tiny", datasets=["me/pairs"])
    assert files_to_upload(folder) == sorted(["README.md", *saved, *code])
    assert 'from_pretrained("me/dina-tiny"' in (tmp_path / "upload" / "README.md").read_text()
    loaded = DiNaRewardModel.from_pretrained(folder)
    batch = PreferenceCollator()([train_set[0]])
    inputs = (batch["chosen_latents"], torch.tensor([400.0]), batch["prompt_embeds"], batch["pooled_prompt_embeds"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(*inputs).rewards, trainer.model.eval()(*inputs).rewards)


def test_cli_trains_from_a_config_with_raw_data_and_resumes(tiny_sd3_dir, train_cache_dir, tmp_path):
    rng = random.Random(3)
    images = tmp_path / "images"
    images.mkdir()
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for i in range(8):
            for side, colour in (("c", "red"), ("r", "blue")):
                (images / f"{i}{side}.png").write_bytes(render(colour, rng))
            f.write(
                json.dumps({"prompt": "a red circle", "chosen": f"images/{i}c.png", "rejected": f"images/{i}r.png"})
            )
            f.write("\n")
    config = {
        "model": {"base": tiny_sd3_dir, "config": TINY},
        "data": {
            "train": {"source": str(tmp_path / "pairs.jsonl"), "format": "pairs"},
            "eval": {"cached": train_cache_dir},
            "cache": {"max_sequence_length": 8, "resolution": 32, "shard_size": 4},
        },
        "training": {
            "output_dir": str(tmp_path / "run"),
            "per_device_train_batch_size": 4,
            "max_steps": 2,
            "save_steps": 1,
            "report_to": "none",
            "disable_tqdm": True,
            "use_cpu": True,
        },
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    subparsers = argparse.ArgumentParser(prog="dina").add_subparsers()
    train_parser = add_train_parser(subparsers)
    run_train(train_parser.parse_args(["--config", str(tmp_path / "config.json")]))
    run = tmp_path / "run"
    assert {"checkpoint-1", "checkpoint-2", "_cache", "model.safetensors", "README.md"} <= set(os.listdir(run))
    assert len(load_cached_preferences(run / "_cache" / "train")) == 8
    assert ModelCard.load(run / "README.md").data.datasets == [str(tmp_path / "pairs.jsonl")]

    config["training"]["max_steps"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    args = train_parser.parse_args(["--config", str(tmp_path / "config.json"), "--resume"])
    assert args.resume is True
    written = os.path.getmtime(run / "checkpoint-2" / "model.safetensors")
    run_train(args)
    assert json.loads((run / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3
    assert os.path.getmtime(run / "checkpoint-2" / "model.safetensors") == written  # continued, not restarted


def test_example_config_is_valid(tmp_path):
    config = load_config(os.path.join(os.path.dirname(__file__), "..", "hub_configs", "train_example.yaml"))
    assert set(config["model"]["config"]) <= set(DiNaConfig().to_dict())
    args = DiNaTrainingArguments(**{**config["training"], "output_dir": str(tmp_path), "use_cpu": True})
    assert args.ema_decay == 0.999 and args.metric_for_best_model == "accuracy_ensemble" and args.greater_is_better
    with pytest.raises(ValueError, match="unknown key"):
        (tmp_path / "bad.json").write_text(json.dumps({**config, "optimizer": {}}))
        load_config(tmp_path / "bad.json")
