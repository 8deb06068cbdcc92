"""Alignment (ReFL / Flow-GRPO) of a tiny SD3 generator against a tiny DiNa reward sharing its blocks."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from safetensors import safe_open

from modeling_dina import DiNaRewardModel
from modeling_dina.alignment import (
    GENERATOR_ADAPTER,
    AlignmentConfig,
    DiNaLatentReward,
    add_generator_lora,
    align,
    encode_prompts,
    euler_step,
    generator_lora_parameters,
    generator_lora_state_dict,
    group_advantages,
    guided_velocity,
    inference_schedule,
    initial_latents,
    latest_checkpoint,
    sde_step,
)
from modeling_dina.alignment.cli import add_align_parser, run_align
from modeling_dina.alignment.common import ParameterEMA, RewardMeter, pretrain_loss, velocity_errors
from modeling_dina.alignment.dpo import dpo_loss
from modeling_dina.alignment.loop import prepare_context
from modeling_dina.alignment.refl import refl_step
from modeling_dina.alignment.reward_fns import decode_latents
from modeling_dina.tiny_sd3 import TINY_DINA

PROMPTS = ["a red circle", "two blue squares", "a green triangle left of a cat"]


def load_pipe(folder):
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build(folder, seed=0, generator_lora_first=False):
    """A generator pipeline and a DiNa reward sharing its transformer (perturbed so LoRA and head matter); the
    generator LoRA is added by `align` unless `generator_lora_first` adds it before the reward's."""
    pipe = load_pipe(folder)
    torch.manual_seed(seed)
    if generator_lora_first:
        add_generator_lora(pipe.transformer, rank=4, alpha=8)
    model = DiNaRewardModel.from_base(pipe.transformer, **TINY_DINA).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return pipe, model


def config(tmp_path, name, **kwargs):
    values = dict(
        prompts=PROMPTS,
        steps=2,
        batch_size=2,
        group_size=2,
        num_inference_steps=3,
        guidance_scale=3.0,
        lora_rank=4,
        lora_alpha=8,
        learning_rate=1e-2,
        output_dir=str(tmp_path / name),
        checkpoint_every=0,
    )
    return AlignmentConfig(**{**values, **kwargs})


class RecordingReward(DiNaLatentReward):
    """Draws its own noise and records every call, so a test can recompute the rewards independently."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def __call__(self, latents, prompt_embeds, pooled_prompt_embeds):
        noise = torch.randn(latents.shape, generator=self.generator)
        rewards = super().__call__(latents, prompt_embeds, pooled_prompt_embeds, noise=noise)
        self.calls.append([t.detach().clone() for t in (latents, prompt_embeds, pooled_prompt_embeds, noise, rewards)])
        return rewards


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_sampler_reproduces_the_pipeline_with_the_generator_lora_active(tiny_sd3_dir, tmp_path):
    pipe, model = build(tiny_sd3_dir)
    cfg = config(tmp_path, "run")
    prepare_context(pipe, DiNaLatentReward(model), cfg)  # adds the generator LoRA (B = 0): give it an effect
    with torch.no_grad():
        for n, p in pipe.transformer.named_parameters():
            if f"lora_B.{GENERATOR_ADAPTER}" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    cond = encode_prompts(pipe, PROMPTS[:2], guidance_scale=3.0, max_sequence_length=16)
    start = initial_latents(pipe, 2, 32, 32, torch.Generator().manual_seed(0))
    sigmas, timesteps = inference_schedule(pipe, 3, start.shape)
    latents = start
    with torch.no_grad():
        for i in range(3):
            velocity = guided_velocity(pipe.transformer, latents, timesteps[i], cond, 3.0)
            latents = euler_step(latents, velocity, sigmas[i], sigmas[i + 1])
    expected = pipe(
        prompt_embeds=cond.prompt_embeds,
        pooled_prompt_embeds=cond.pooled_prompt_embeds,
        negative_prompt_embeds=cond.negative_prompt_embeds,
        negative_pooled_prompt_embeds=cond.negative_pooled_prompt_embeds,
        latents=start,
        num_inference_steps=3,
        guidance_scale=3.0,
        max_sequence_length=16,
        output_type="latent",
    ).images
    assert torch.equal(latents, expected)
    # the generator LoRA is what sampling sees: without it the result differs
    plain = load_pipe(tiny_sd3_dir)
    plain_out = plain(
        prompt_embeds=cond.prompt_embeds,
        pooled_prompt_embeds=cond.pooled_prompt_embeds,
        negative_prompt_embeds=cond.negative_prompt_embeds,
        negative_pooled_prompt_embeds=cond.negative_pooled_prompt_embeds,
        latents=start,
        num_inference_steps=3,
        guidance_scale=3.0,
        output_type="latent",
    ).images
    assert not torch.allclose(latents, plain_out, atol=1e-4)


def test_refl_trains_only_the_generator_lora_on_one_shared_base(tiny_sd3_dir, tmp_path):
    pipe, model = build(tiny_sd3_dir)
    add_generator_lora(pipe.transformer, rank=4, alpha=8)  # after the reward's adapter; align keeps it
    reward = RecordingReward(model, noise_level=0.4, seed=0)
    base_before = snapshot(pipe.transformer)
    head_before = snapshot(model.reward_head)
    evaluations = []

    def eval_fn(p, step):
        assert p is pipe
        evaluations.append(step)
        return {"compliance": step / 10}

    cfg = config(tmp_path, "refl", steps=3, grad_steps=2, kl_weight=0.5, eval_every=2, checkpoint_every=2)
    records = align(pipe, reward, cfg, eval_fn=eval_fn, progress=False)

    # only the generator LoRA moved; base weights, reward LoRA and reward head are bit-identical and got no gradient
    changed = {n for n, p in pipe.transformer.named_parameters() if not torch.equal(p, base_before[n])}
    generator_keys = {n for n in base_before if f".{GENERATOR_ADAPTER}." in n}
    assert changed and changed <= generator_keys
    assert any(f"lora_B.{GENERATOR_ADAPTER}" in n for n in changed)
    assert all(torch.equal(p, head_before[n]) for n, p in model.reward_head.named_parameters())
    frozen = [p for n, p in model.named_parameters() if f".{GENERATOR_ADAPTER}." not in n]
    assert all(not p.requires_grad and p.grad is None for p in frozen)
    # one copy of the base: the reward's backbone holds the transformer's own tensors
    base_ptrs = {p.data_ptr() for p in pipe.transformer.parameters()}
    assert all(p.data_ptr() in base_ptrs for n, p in model.backbone.named_parameters())
    all_ptrs = {p.data_ptr() for p in [*pipe.transformer.parameters(), *model.parameters()]}
    assert len(all_ptrs) == len(base_ptrs) + len(list(model.reward_head.parameters()))

    # the rewards seen during alignment are the reward model's standalone values (no generator LoRA leaking in):
    # recompute them on a fresh transformer that never had a generator adapter
    fresh_pipe = load_pipe(tiny_sd3_dir)
    fresh = DiNaRewardModel.from_base(fresh_pipe.transformer, **TINY_DINA).eval()
    # (the reward's `trainable_state_dict` also picks up the generator's LoRA keys in the shared blocks: drop them)
    trained = {k: v for k, v in model.trainable_state_dict().items() if f".{GENERATOR_ADAPTER}." not in k}
    fresh.load_trainable_state_dict(trained)
    sigma, timestep = fresh.noise_grid.snap(0.4)
    assert len(reward.calls) == 3
    for latents, embeds, pooled, noise, rewards in reward.calls:
        noisy = (1 - sigma) * latents + sigma * noise
        with torch.no_grad():
            standalone = fresh(noisy, timestep, embeds, pooled).rewards
        torch.testing.assert_close(rewards, standalone, rtol=0, atol=1e-6)

    # logs, evaluation hook, curves, checkpoint
    log = [json.loads(line) for line in open(tmp_path / "refl" / "log.jsonl")]
    assert log == records and [r["step"] for r in log] == [0, 1, 2, 3]
    assert evaluations == [0, 2, 3] and log[2]["eval/compliance"] == 0.2
    train = log[1:]
    assert all(math.isfinite(r["reward_mean"]) and r["reward_time_s"] > 0 and r["peak_memory_mb"] > 0 for r in train)
    assert train[0]["reward_flops"] > 0 and "reward_flops" not in train[1]
    assert all(r["kl"] >= 0 for r in train) and train[-1]["kl"] > 0
    assert (tmp_path / "refl" / "curves.png").stat().st_size > 0
    assert latest_checkpoint(tmp_path / "refl").name == "step-000002"


def test_aligned_lora_loads_into_a_fresh_pipeline_with_diffusers(tiny_sd3_dir, tmp_path):
    pipe, model = build(tiny_sd3_dir)
    cfg = config(tmp_path, "refl", steps=2, kl_type="weights", kl_weight=1e-3)
    align(pipe, DiNaLatentReward(model), cfg, progress=False)
    # the file holds exactly the generator LoRA, in diffusers' key names (no trace of the reward's adapter)
    with safe_open(str(tmp_path / "refl" / "lora" / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert len(keys) == len(generator_lora_parameters(pipe.transformer))
    assert all(k.startswith("transformer.") and ".lora_" in k for k in keys)
    assert not any("dina" in k or GENERATOR_ADAPTER in k for k in keys)
    fresh, plain = load_pipe(tiny_sd3_dir), load_pipe(tiny_sd3_dir)
    fresh.load_lora_weights(tmp_path / "refl" / "lora")
    kwargs = dict(prompt=PROMPTS[:2], num_inference_steps=3, guidance_scale=3.0, max_sequence_length=16)
    outputs = [
        p(**kwargs, generator=torch.Generator().manual_seed(0), output_type="latent").images
        for p in (pipe, fresh, plain)
    ]
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-5)
    assert not torch.allclose(outputs[2], outputs[0], atol=1e-4)


def test_refl_gradient_checkpointing_gives_the_same_update(tiny_sd3_dir, tmp_path):
    results = []
    for checkpointing in (False, True):
        pipe, model = build(tiny_sd3_dir)
        cfg = config(tmp_path, f"gc{checkpointing}", grad_steps=None, gradient_checkpointing=checkpointing)
        ctx = prepare_context(pipe, DiNaLatentReward(model), cfg)
        assert pipe.transformer.gradient_checkpointing is checkpointing
        refl_step(ctx, PROMPTS[:2], RewardMeter(torch.device("cpu")))
        results.append(generator_lora_state_dict(pipe.transformer))
    for key, value in results[0].items():
        torch.testing.assert_close(results[1][key], value, rtol=1e-5, atol=1e-7)


def test_refl_policy_grad_steps_update_the_lora_only_at_the_first_steps(tiny_sd3_dir, tmp_path):
    """`policy_grad_steps=1` of 3: the LoRA's gradient is that of the chain in which the later two steps run with the
    LoRA's weights held as constants (recomputed by hand with `torch.func.functional_call`), and differs from the
    full chain's."""
    reward = lambda latents, embeds, pooled: latents.float().sin().mean(dim=(1, 2, 3))  # noqa: E731
    grads = {}
    for policy_grad_steps in (1, None):
        pipe = load_pipe(tiny_sd3_dir)
        cfg = config(tmp_path, f"pg{policy_grad_steps}", grad_steps=None, policy_grad_steps=policy_grad_steps)
        ctx = prepare_context(pipe, reward, dataclasses.replace(cfg, max_sequence_length=16, max_grad_norm=None))
        with torch.no_grad():  # give the LoRA (B = 0 at start) an effect
            for p in ctx.params:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
        start = ctx.generator.get_state()
        ctx.optimizer_step = lambda: 0.0  # keep the gradients, change nothing
        refl_step(ctx, PROMPTS[:2], RewardMeter(torch.device("cpu")))
        grads[policy_grad_steps] = [p.grad.clone() for p in ctx.params]
    transformer = pipe.transformer
    fixed = {n: p.detach() for n, p in transformer.named_parameters() if p.requires_grad}
    ctx.generator.set_state(start)
    latents = initial_latents(pipe, 2, ctx.height, ctx.width, ctx.generator)
    sigmas, timesteps = inference_schedule(pipe, 3, latents.shape)
    cond = ctx.encode(PROMPTS[:2])
    for i in range(3):
        model = transformer if i == 0 else lambda **kw: torch.func.functional_call(transformer, fixed, (), kw)
        velocity = guided_velocity(model, latents, timesteps[i], cond, 3.0)
        latents = euler_step(latents, velocity, sigmas[i], sigmas[i + 1] if i < 2 else 0.0)
    expected = torch.autograd.grad(-reward(latents, None, None).mean(), ctx.params)
    for got, want in zip(grads[1], expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-8)
    assert any(not torch.allclose(a, b, rtol=1e-3) for a, b in zip(grads[1], grads[None]))


def test_refl_rejects_a_non_differentiable_reward(tiny_sd3_dir, tmp_path):
    pipe = load_pipe(tiny_sd3_dir)
    cfg = config(tmp_path, "nd", max_sequence_length=16)
    with pytest.raises(ValueError, match="not differentiable"):
        align(pipe, lambda latents, embeds, pooled: latents.detach().mean(dim=(1, 2, 3)), cfg, progress=False)


def test_grpo_trains_only_the_generator_lora(tiny_sd3_dir, tmp_path):
    pipe, model = build(tiny_sd3_dir, generator_lora_first=True)
    base_before, head_before = snapshot(pipe.transformer), snapshot(model.reward_head)
    cfg = config(tmp_path, "grpo", method="grpo", steps=2, kl_weight=0.1, train_timesteps=2, inner_epochs=2)
    records = align(pipe, DiNaLatentReward(model), cfg, progress=False)
    changed = {n for n, p in pipe.transformer.named_parameters() if not torch.equal(p, base_before[n])}
    assert changed and all(f".{GENERATOR_ADAPTER}." in n for n in changed)
    assert all(torch.equal(p, head_before[n]) for n, p in model.reward_head.named_parameters())
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["reward_flops"] > 0
    assert all(math.isfinite(r["loss"]) and 0.9 < r["ratio_mean"] < 1.1 and r["kl"] >= 0 for r in records)


def test_grpo_shared_starts_and_sde_window(tiny_sd3_dir, tmp_path, monkeypatch):
    """With `share_initial_noise` a group's trajectories start from one noise; with `sde_steps=2` only the first two
    sampling steps are stochastic (and trained), the rest is the deterministic Euler step."""
    from modeling_dina.alignment import grpo

    calls = {"sde": 0, "euler": 0, "starts": []}
    real_sde, real_euler, real_velocity = grpo.sde_step, grpo.euler_step, grpo.guided_velocity

    def count(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapped

    def velocity(transformer, latents, timestep, cond, scale, **kwargs):
        if timestep == calls.setdefault("first_t", timestep) and not torch.is_grad_enabled():
            calls["starts"].append(latents.clone())
        return real_velocity(transformer, latents, timestep, cond, scale, **kwargs)

    monkeypatch.setattr(grpo, "sde_step", count("sde", real_sde))
    monkeypatch.setattr(grpo, "euler_step", count("euler", real_euler))
    monkeypatch.setattr(grpo, "guided_velocity", velocity)
    pipe, model = build(tiny_sd3_dir)
    cfg = config(tmp_path, "window", method="grpo", steps=1, group_size=3, num_inference_steps=4, sde_steps=2)
    cfg.share_initial_noise = True
    align(pipe, DiNaLatentReward(model), cfg, progress=False)
    # sampling: 2 SDE + 2 Euler steps; training: the 2 SDE transitions recomputed
    assert calls["sde"] == 2 + 2 and calls["euler"] == 2
    starts = calls["starts"][0].view(2, 3, *calls["starts"][0].shape[1:])  # 2 prompts x group of 3
    assert all(torch.equal(g[0], g[i]) for g in starts for i in (1, 2)) and not torch.equal(starts[0, 0], starts[1, 0])
    with pytest.raises(ValueError, match="sde_steps"):
        AlignmentConfig(method="grpo", sde_steps=0)


def test_grpo_raises_a_simple_reward(tiny_sd3_dir, tmp_path):
    """The policy gradient points uphill: a reward the generator can trivially move (the mean of a latent channel)
    climbs within a few updates, and the same run with the reward negated descends."""

    def channel_mean(latents, prompt_embeds, pooled_prompt_embeds):
        return latents[:, 0].mean(dim=(1, 2)).float()

    means = {}
    for sign in (1, -1):
        pipe = load_pipe(tiny_sd3_dir)
        cfg = config(tmp_path, f"simple{sign}", method="grpo", steps=8, batch_size=2, group_size=4, learning_rate=2e-2)
        cfg.share_initial_noise, cfg.sde_steps = True, 2
        records = align(pipe, lambda *a, s=sign: s * channel_mean(*a), cfg, progress=False)
        rewards = [sign * r["reward_mean"] for r in records]
        means[sign] = (np.mean(rewards[:3]), np.mean(rewards[-3:]))
    assert means[1][1] > means[1][0] + 0.3 and means[-1][1] < means[-1][0] - 0.3, means


def test_sde_step_log_prob_and_limits():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    sigma, sigma_next, sigma_max = torch.tensor(0.6), torch.tensor(0.4), torch.tensor(0.97)
    nxt, log_prob, mean, std = sde_step(x, v, sigma, sigma_next, sigma_max, 0.7, generator=g)
    expected = torch.distributions.Normal(mean, std).log_prob(nxt).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob, expected)
    # recomputing on the stored transition gives the stored log-probability (the PPO ratio starts at exactly 1)
    again = sde_step(x, v, sigma, sigma_next, sigma_max, 0.7, next_latents=nxt)[1]
    assert torch.equal(again, log_prob)
    # a vanishing noise level gives back the Euler step; sigma = 1 stays finite
    mean_small = sde_step(x, v, sigma, sigma_next, sigma_max, 1e-4, generator=g)[2]
    torch.testing.assert_close(mean_small, euler_step(x, v, sigma, sigma_next), atol=1e-5, rtol=0)
    assert torch.isfinite(sde_step(x, v, torch.tensor(1.0), sigma_next, sigma_max, 0.7, generator=g)[1]).all()


def test_sde_step_on_a_coarse_noise_grid():
    x, v = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(2, 4, 8, 8)
    sigma, sigma_next, sigma_max = torch.tensor(0.9), torch.tensor(0.7), torch.tensor(0.97)
    args = (x, v, sigma, sigma_next, sigma_max, 0.7)
    # a grid as fine as the latent is the per-element step, draw for draw
    fine = sde_step(*args, generator=torch.Generator().manual_seed(1))
    same = sde_step(*args, generator=torch.Generator().manual_seed(1), noise_grid=8)
    assert all(torch.equal(a, b) for a, b in zip(fine, same))
    nxt, log_prob, mean, std = sde_step(*args, generator=torch.Generator().manual_seed(1), noise_grid=2)
    blocks = (nxt - mean).unfold(2, 4, 4).unfold(3, 4, 4)  # (B, C, 2, 2, 4, 4): constant within each block
    torch.testing.assert_close(blocks, blocks[..., :1, :1].expand_as(blocks))
    pooled = torch.nn.functional.avg_pool2d(nxt - mean, 4)
    torch.testing.assert_close(log_prob, torch.distributions.Normal(0.0, std).log_prob(pooled).mean(dim=(1, 2, 3)))
    assert torch.equal(sde_step(*args, next_latents=nxt, noise_grid=2)[1], log_prob)
    with pytest.raises(ValueError, match="noise_grid"):
        sde_step(*args, generator=torch.Generator(), noise_grid=3)


def test_group_advantages():
    adv = group_advantages(torch.tensor([1.0, 3.0, 5.0, 5.0]), group_size=2)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, 0.0, 0.0]), atol=1e-3, rtol=0)
    # one std for the batch: the centred rewards (-1, 1, 0, 0) have RMS sqrt(1/2), so the quiet group stays quiet
    adv = group_advantages(torch.tensor([1.0, 3.0, 5.0, 5.0]), group_size=2, std="batch")
    torch.testing.assert_close(adv, torch.tensor([-(2**0.5), 2**0.5, 0.0, 0.0]), atol=1e-3, rtol=0)
    adv = group_advantages(torch.tensor([1.0, 3.0, 5.0, 5.5]), group_size=2, std="batch")
    scale = ((1 + 1 + 0.0625 + 0.0625) / 4) ** 0.5
    torch.testing.assert_close(adv, torch.tensor([-1, 1, -0.25, 0.25]) / scale, atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="'group' or 'batch'"):
        group_advantages(torch.ones(4), group_size=2, std="prompt")
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.ones(4), group_size=3)


def test_resume_continues_exactly_like_an_uninterrupted_run(tiny_sd3_dir, tmp_path):
    def run(name, resume=False, stop_at=None):
        pipe, model = build(tiny_sd3_dir)
        cfg = config(tmp_path, name, method="grpo", steps=4, checkpoint_every=2, train_timesteps=2, eval_every=1)

        def eval_fn(p, step):
            if step == stop_at:
                raise KeyboardInterrupt
            return {}

        align(pipe, DiNaLatentReward(model, seed=3), cfg, eval_fn=eval_fn, resume=resume, progress=False)
        return pipe

    reference = run("straight")
    with pytest.raises(KeyboardInterrupt):
        run("interrupted", stop_at=3)  # dies after logging nothing for step 3; the last checkpoint is step 2
    with pytest.raises(FileExistsError):
        run("interrupted")  # a previous run is there: resuming must be asked for
    resumed = run("interrupted", resume=True)
    expected, got = generator_lora_state_dict(reference.transformer), generator_lora_state_dict(resumed.transformer)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    logs = [[json.loads(x) for x in open(tmp_path / name / "log.jsonl")] for name in ("straight", "interrupted")]
    assert [r["step"] for r in logs[1]] == [0, 1, 2, 3, 4]  # step 0: the (empty) evaluation before training
    assert [r.get("reward_mean") for r in logs[1]] == [r.get("reward_mean") for r in logs[0]]


def test_config_validation_and_file(tmp_path):
    with pytest.raises(ValueError, match="method"):
        AlignmentConfig(method="ppo")
    with pytest.raises(ValueError, match="group_size"):
        AlignmentConfig(method="grpo", group_size=1)
    with pytest.raises(ValueError, match="pixel_reward"):
        AlignmentConfig(reward="pixel")
    (tmp_path / "c.yaml").write_text("method: grpo\nsteps: 3\nbogus: 1\n")
    with pytest.raises(ValueError, match="unknown fields \\['bogus'\\]"):
        AlignmentConfig.from_file(tmp_path / "c.yaml")
    (tmp_path / "p.txt").write_text("a red circle\n\ntwo cats\n")
    (tmp_path / "c.yaml").write_text(f"method: grpo\nreward_step: [1, 2]\nprompts: {tmp_path / 'p.txt'}\n")
    cfg = AlignmentConfig.from_file(tmp_path / "c.yaml")
    assert cfg.method == "grpo" and cfg.reward_step == [1, 2] and cfg.load_prompts() == ["a red circle", "two cats"]


def mean_brightness(images, prompts):
    """A pixel reward for the CLI test: the mean brightness of each image."""
    return [float(np.asarray(im.convert("L")).mean()) / 255 for im in images]


def test_cli_runs_both_reward_kinds(tiny_sd3_dir, tmp_path):
    import argparse

    _, model = build(tiny_sd3_dir)
    model.save_pretrained(tmp_path / "dina")
    parser = argparse.ArgumentParser()
    add_align_parser(parser.add_subparsers(dest="command"))
    common = dict(pipeline=tiny_sd3_dir, prompts=PROMPTS, steps=1, batch_size=1, group_size=2, num_inference_steps=2)
    runs = {
        "latent": dict(reward=str(tmp_path / "dina"), method="refl"),
        "pixel": dict(reward="pixel", pixel_reward="test_alignment:mean_brightness", method="grpo"),
    }
    for name, extra in runs.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({**common, **extra, "output_dir": str(tmp_path / name), "checkpoint_every": 1}))
        args = parser.parse_args(["align", "--config", str(path)])
        assert args.func is run_align
        args.func(args)
        assert (tmp_path / name / "lora" / "pytorch_lora_weights.safetensors").is_file()
        assert (tmp_path / name / "checkpoints" / "step-000001" / "training_state.pt").is_file()
        args = parser.parse_args(["align", "--config", str(path), "--resume"])
        args.func(args)  # nothing left to do: resumes at the last step
        assert len(open(tmp_path / name / "log.jsonl").readlines()) == 1


def test_align_help_says_a_config_naming_functions_is_code():
    import argparse

    from modeling_dina.alignment.cli import add_align_parser

    parser = add_align_parser(argparse.ArgumentParser(prog="dina").add_subparsers())
    text = " ".join(parser.format_help().split())
    assert (
        "A config is code: its `pixel_reward` and `eval_fn` entries name `module:function`, which is imported" in text
    )
    assert "trusted configs only" in text


def test_pretrain_flow_matching_loss_by_hand(tiny_sd3_dir, tmp_path):
    pipe = load_pipe(tiny_sd3_dir)
    clean = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def data(batch_size, generator):
        items = torch.randint(len(clean), (batch_size,), generator=generator)
        return clean[items], [PROMPTS[i] for i in items.tolist()]

    cfg = config(tmp_path, "fm", pretrain_weight=1.0, pretrain_batch_size=2, max_sequence_length=16)
    ctx = prepare_context(pipe, lambda *a: None, cfg, pretrain_data=data)
    loss = pretrain_loss(ctx)
    g = torch.Generator().manual_seed(cfg.seed)
    x0, prompts = data(2, g)
    sigma = torch.sigmoid(torch.randn(2, generator=g))
    noise = torch.randn(x0.shape, generator=g)
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompts, None, None, do_classifier_free_guidance=False, max_sequence_length=16
    )
    s = sigma.view(-1, 1, 1, 1)
    with torch.no_grad():
        v = pipe.transformer(
            hidden_states=(1 - s) * x0 + s * noise,
            timestep=sigma * 1000,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
        ).sample
    torch.testing.assert_close(loss.detach(), ((v - (noise - x0)) ** 2).mean())
    with pytest.raises(ValueError, match="pretrain_data"):
        pretrain_loss(prepare_context(load_pipe(tiny_sd3_dir), lambda *a: None, cfg))


def test_refl_recipe_pretrain_loss_ema_and_early_stopping(tiny_sd3_dir, tmp_path):
    pipe, model = build(tiny_sd3_dir)
    clean = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    data = lambda batch_size, g: (clean[:batch_size], PROMPTS[:1] * len(clean[:batch_size]))  # noqa: E731
    seen, scripted = {}, [1.0, 3.0, 2.0, 2.0, 5.0]

    def eval_fn(p, step):
        seen[step] = generator_lora_state_dict(p.transformer)
        return {"validation_reward": scripted[step]}

    cfg = config(
        tmp_path,
        "recipe",
        steps=5,
        reward_step=[1, 2],
        pretrain_weight=0.5,
        ema_decay=0.5,
        eval_every=1,
        early_stopping_metric="validation_reward",
        early_stopping_patience=2,
    )
    records = align(pipe, DiNaLatentReward(model), cfg, eval_fn=eval_fn, pretrain_data=data, progress=False)
    # best at step 1, no improvement at steps 2 and 3: stopped there, before the (better) step 4 is ever reached
    assert [r["step"] for r in records] == [0, 1, 2, 3] and records[-1]["best_step"] == 1
    assert all(r["pretrain_loss"] > 0 and r["reward_step"] in (1, 2) for r in records[1:])
    saved = {
        k.removeprefix("transformer."): v
        for k, v in safe_open_all(tmp_path / "recipe" / "lora" / "pytorch_lora_weights.safetensors").items()
    }
    assert all(torch.equal(saved[k], seen[1][k]) for k in saved)  # the best evaluated LoRA is the one saved
    current = generator_lora_state_dict(pipe.transformer)
    assert all(torch.equal(current[k], seen[1][k]) for k in current)  # and the pipe ends with it
    # the evaluations saw the EMA: after one step with decay 0.5 the LoRA's B (zero at the start) is half the raw B
    raw_pipe, raw_model = build(tiny_sd3_dir)
    raw = {}
    cfg = config(tmp_path, "raw", steps=1, reward_step=[1, 2], pretrain_weight=0.5, eval_every=1)
    eval_raw = lambda p, step: raw.update({step: generator_lora_state_dict(p.transformer)}) or {}  # noqa: E731
    align(raw_pipe, DiNaLatentReward(raw_model), cfg, eval_fn=eval_raw, pretrain_data=data, progress=False)
    b_keys = [k for k in raw[1] if "lora_B" in k]
    assert raw[1][b_keys[0]].abs().sum() > 0
    assert all(torch.allclose(seen[1][k], 0.5 * raw[1][k]) for k in b_keys)


def safe_open_all(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_parameter_ema_by_hand():
    p = torch.nn.Parameter(torch.tensor([0.0, 2.0]))
    ema = ParameterEMA([p], decay=0.75)
    with torch.no_grad():
        p.copy_(torch.tensor([4.0, 2.0]))
    ema.update()
    torch.testing.assert_close(ema.shadow[0], torch.tensor([1.0, 2.0]))
    with ema.applied():
        torch.testing.assert_close(p.detach(), torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(p.detach(), torch.tensor([4.0, 2.0]))


def test_recipe_config_validation():
    with pytest.raises(ValueError, match="eval_every"):
        AlignmentConfig(early_stopping_metric="validation_reward")
    with pytest.raises(ValueError, match="ema_decay"):
        AlignmentConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="pretrain_weight"):
        AlignmentConfig(method="grpo", pretrain_weight=1.0)


def test_guided_velocity_errors_by_hand(tiny_sd3_dir, tmp_path):
    """`fit_guided`: the error of `u + g (c - u)` (per-sample timesteps), the velocity the CFG sampler follows."""
    pipe = load_pipe(tiny_sd3_dir)
    cfg = config(tmp_path, "guided", guidance_scale=3.0, max_sequence_length=16)
    ctx = prepare_context(pipe, lambda *a: None, cfg)
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    sigma = torch.tensor([0.3, 0.8])
    cond = ctx.encode(PROMPTS[:2])
    with torch.no_grad():
        errors = velocity_errors(ctx, x0, cond, sigma, noise, 3.0)
        s = sigma.view(-1, 1, 1, 1)
        x = (1 - s) * x0 + s * noise

        def velocity(embeds, pooled):
            return pipe.transformer(
                hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=embeds, pooled_projections=pooled
            ).sample

        u = velocity(cond.negative_prompt_embeds, cond.negative_pooled_prompt_embeds)
        c = velocity(cond.prompt_embeds, cond.pooled_prompt_embeds)
        conditional = velocity_errors(ctx, x0, cond, sigma, noise)
    torch.testing.assert_close(errors, ((u + 3.0 * (c - u) - (noise - x0)) ** 2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(conditional, ((c - (noise - x0)) ** 2).mean(dim=(1, 2, 3)))


def test_guided_velocity_without_the_unconditional_gradient(tiny_sd3_dir, tmp_path):
    """`train_unconditional=False`: the guided velocity keeps its value, and its gradient is `g` times the
    conditional branch's alone (the prompt-independent branch gets none)."""
    pipe = load_pipe(tiny_sd3_dir)
    ctx = prepare_context(pipe, lambda *a: None, config(tmp_path, "detach", max_sequence_length=16))
    with torch.no_grad():  # give the LoRA (B = 0 at start) an effect
        for p in ctx.params:
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t, cond = torch.tensor(600.0), ctx.encode(PROMPTS[:2])

    def value_and_grads(**kwargs):
        velocity = guided_velocity(pipe.transformer, x, t, cond, **kwargs)
        grads = torch.autograd.grad(velocity.square().sum(), ctx.params, allow_unused=True)
        return velocity.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(ctx.params, grads)]

    full, full_grads = value_and_grads(guidance_scale=3.0)
    detached, detached_grads = value_and_grads(guidance_scale=3.0, detach_unconditional=True)
    torch.testing.assert_close(detached, full)
    text = guided_velocity(pipe.transformer, x, t, cond, 1.0)
    expected = torch.autograd.grad((2 * full * 3.0 * text).sum(), ctx.params, allow_unused=True)
    for got, want in zip(detached_grads, expected):  # (the batch of 4 and of 2 round differently)
        torch.testing.assert_close(got, torch.zeros_like(got) if want is None else want, rtol=1e-3, atol=1e-6)
    assert any(not torch.allclose(a, b) for a, b in zip(detached_grads, full_grads))


@pytest.mark.parametrize("fit_guided", [False, True])
def test_raft_fits_the_best_candidate_of_each_group(tiny_sd3_dir, tmp_path, monkeypatch, fit_guided):
    import modeling_dina.alignment.raft as raft

    pipe = load_pipe(tiny_sd3_dir)
    seen, calls, updates = {}, [], []

    def brightness(latents, embeds, pooled):
        seen["latents"] = latents.detach().clone()
        return latents.mean(dim=(1, 2, 3))

    cfg = config(
        tmp_path,
        "raft",
        method="raft",
        steps=1,
        group_size=3,
        inner_epochs=2,
        max_sequence_length=16,
        fit_guided=fit_guided,
    )
    ctx = prepare_context(pipe, brightness, cfg)
    fitted_scale = cfg.guidance_scale if fit_guided else 1.0
    fit, step = raft.flow_matching_loss, ctx.optimizer_step
    monkeypatch.setattr(
        raft, "flow_matching_loss", lambda c, clean, p, g: calls.append((clean, p, g)) or fit(c, clean, p, g)
    )
    monkeypatch.setattr(ctx, "optimizer_step", lambda: updates.append(1) or step())
    record = raft.raft_step(ctx, PROMPTS[:2], RewardMeter(torch.device("cpu")))
    rewards = seen["latents"].mean(dim=(1, 2, 3)).view(2, 3)
    expected = seen["latents"].view(2, 3, *seen["latents"].shape[1:])[torch.arange(2), rewards.argmax(dim=1)]
    assert len(calls) == 2 and len(updates) == 2  # one optimiser step per inner epoch
    assert all(
        torch.equal(clean, expected) and prompts == PROMPTS[:2] and g == fitted_scale for clean, prompts, g in calls
    )
    assert record["kept_reward_mean"] == pytest.approx(rewards.max(dim=1).values.mean().item())
    assert record["kept_reward_mean"] >= record["reward_mean"] and record["loss"] > 0


def test_dpo_loss_by_hand():
    policy = torch.tensor([[0.10, 0.50], [0.30, 0.20]])  # rows: winners, losers; columns: pairs
    reference = torch.tensor([[0.20, 0.40], [0.25, 0.30]])
    beta = 10.0
    inner = [((0.10 - 0.20) - (0.30 - 0.25)), ((0.50 - 0.40) - (0.20 - 0.30))]
    expected = sum(-math.log(1 / (1 + math.exp(0.5 * beta * d))) for d in inner) / 2
    assert dpo_loss(policy, reference, beta).item() == pytest.approx(expected, rel=1e-5)


def test_dpo_pairs_each_groups_best_and_worst_against_the_base(tiny_sd3_dir, tmp_path, monkeypatch):
    import modeling_dina.alignment.dpo as dpo

    pipe = load_pipe(tiny_sd3_dir)
    seen, calls = {}, []

    def brightness(latents, embeds, pooled):
        seen["latents"] = latents.detach().clone()
        return latents.mean(dim=(1, 2, 3))

    cfg = config(tmp_path, "dpo", method="dpo", steps=1, group_size=3, inner_epochs=2, max_sequence_length=16)
    ctx = prepare_context(pipe, brightness, cfg)
    errors = dpo.velocity_errors

    def recording(c, clean, cond, sigma, noise, scale):
        calls.append((clean, sigma, noise, torch.is_grad_enabled()))
        return errors(c, clean, cond, sigma, noise, scale)

    monkeypatch.setattr(dpo, "velocity_errors", recording)
    before = {k: v.clone() for k, v in generator_lora_state_dict(pipe.transformer).items()}
    record = dpo.dpo_step(ctx, PROMPTS[:2], RewardMeter(torch.device("cpu")))
    grouped = seen["latents"].view(2, 3, *seen["latents"].shape[1:])
    rewards = seen["latents"].mean(dim=(1, 2, 3)).view(2, 3)
    winners, losers = grouped[torch.arange(2), rewards.argmax(1)], grouped[torch.arange(2), rewards.argmin(1)]
    assert record["pairs"] == 2 and len(calls) == 4  # per inner epoch: the base (no grad), then the policy
    for (clean, sigma, noise, grad), wants_grad in zip(calls, [False, True, False, True]):
        assert torch.equal(clean, torch.cat([winners, losers])) and grad == wants_grad
        assert torch.equal(sigma[:2], sigma[2:]) and torch.equal(noise[:2], noise[2:])  # a pair shares both
    assert calls[0][2].data_ptr() == calls[1][2].data_ptr() and not torch.equal(calls[0][2], calls[2][2])
    after = generator_lora_state_dict(pipe.transformer)
    assert any(not torch.equal(before[k], after[k]) for k in after)
    assert record["loss"] > 0 and math.isfinite(record["loss"])


def test_reward_refresh_trains_the_reward_on_labelled_policy_pairs(tiny_sd3_dir, tmp_path):
    """Every `every` steps the refresh samples the policy, pairs samples of a prompt by the labeler's verdict and
    fits the reward's LoRA and head to them (the Thurstone loss falls); the generator and the base stay untouched
    by it, and its state is checkpointed and restored on resume."""
    from modeling_dina.alignment.refresh import RewardRefresh

    pipe, model = build(tiny_sd3_dir)
    brightness = lambda images, prompts: [float(np.asarray(im).mean()) for im in images]  # noqa: E731
    sampler = dict(num_inference_steps=2, guidance_scale=1.0, max_sequence_length=16)
    refresh = RewardRefresh(
        model,
        brightness,
        PROMPTS,
        every=2,
        num_prompts=2,
        per_prompt=3,
        train_steps=30,
        learning_rate=3e-3,
        sample_kwargs=sampler,
    )
    head_before, base_before = snapshot(model.reward_head), snapshot(pipe.transformer)
    assert refresh(pipe, 1) == {}  # not a refresh step
    first = refresh(pipe, 2)
    assert first["refresh/pairs"] == 2 * 3  # 3 samples of 2 prompts, all labels distinct: 3 ordered pairs each
    pairs = refresh.buffer
    chosen = model.score_clean(pairs["chosen"], pairs["prompt_embeds"], pairs["pooled_prompt_embeds"], noise_level=0.2)
    rejected = model.score_clean(
        pairs["rejected"], pairs["prompt_embeds"], pairs["pooled_prompt_embeds"], noise_level=0.2
    )
    assert (chosen.rewards > rejected.rewards).float().mean() >= 5 / 6
    assert any(not torch.equal(p, head_before[n]) for n, p in model.reward_head.named_parameters())
    base_now = snapshot(pipe.transformer)
    assert all(torch.equal(base_now[n], p) for n, p in base_before.items() if ".dina_reward." not in n)
    assert not any(p.requires_grad for p in model.parameters())  # frozen again for the alignment step
    state = refresh.state_dict()
    restored = RewardRefresh(model, brightness, PROMPTS, every=2, sample_kwargs=sampler)
    restored.load_state_dict(state)
    assert torch.equal(restored.buffer["chosen"], pairs["chosen"])
    assert restored.generator.get_state().equal(refresh.generator.get_state())


def test_reward_refresh_labels_the_samples_the_method_scored(tiny_sd3_dir, monkeypatch):
    """With `scored`, a refresh labels what the reward scored with prompts since the last refresh (a GRPO group's
    samples), pairs every two of one prompt whose labels differ, samples nothing itself and starts a new record."""
    from modeling_dina.alignment.refresh import RewardRefresh

    pipe, model = build(tiny_sd3_dir)
    reward = DiNaLatentReward(model, noise_level=0.4)
    brightness = lambda images, prompts: [float(np.asarray(im).mean()) for im in images]  # noqa: E731
    refresh = RewardRefresh(model, brightness, PROMPTS, every=2, train_steps=2, scored=reward)
    with pytest.raises(ValueError, match="scored"):
        RewardRefresh(build(tiny_sd3_dir)[1], brightness, PROMPTS, scored=reward)
    monkeypatch.setattr(refresh, "sample", lambda pipe: pytest.fail("a scored refresh must not sample"))
    prompts = [PROMPTS[0]] * 3 + [PROMPTS[1]] * 2
    latents = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = encode_prompts(pipe, prompts, guidance_scale=1.0, max_sequence_length=16)
    reward(latents, cond.prompt_embeds, cond.pooled_prompt_embeds, prompts=prompts)
    reward(latents[:3], cond.prompt_embeds[:3], cond.pooled_prompt_embeds[:3])  # no prompts: not recorded
    assert len(reward.scored) == 1
    assert refresh(pipe, 2)["refresh/pairs"] == 3 + 1  # distinct labels: 3 pairs of the first prompt, 1 of the second
    labels = brightness(decode_latents(pipe, latents), prompts)
    for chosen, rejected in zip(refresh.buffer["chosen"], refresh.buffer["rejected"]):
        i = next(k for k in range(5) if torch.equal(latents[k], chosen))
        j = next(k for k in range(5) if torch.equal(latents[k], rejected))
        assert prompts[i] == prompts[j] and labels[i] > labels[j]
    assert reward.scored == []


def test_reward_refresh_trains_at_the_given_noise_levels(tiny_sd3_dir, monkeypatch):
    """With `noise_levels`, every pair of a refresh update is seen at one of those levels (both latents of a pair at
    the same one); without, the levels are spread over [0, 1]; levels outside [0, 1] are refused."""
    from modeling_dina.alignment.refresh import RewardRefresh

    pipe, model = build(tiny_sd3_dir)
    brightness = lambda images, prompts: [float(np.asarray(im).mean()) for im in images]  # noqa: E731
    with pytest.raises(ValueError, match="noise_levels"):
        RewardRefresh(model, brightness, PROMPTS, noise_levels=[0.4, 1.5])
    seen = []
    score_clean = model.score_clean

    def spy(*args, noise_level=None, **kwargs):
        seen.append(noise_level.clone())
        return score_clean(*args, noise_level=noise_level, **kwargs)

    monkeypatch.setattr(model, "score_clean", spy)
    for levels in ([0.4, 0.7], None):
        seen.clear()
        refresh = RewardRefresh(model, brightness, PROMPTS, train_steps=3, batch_size=4, noise_levels=levels)
        cond = encode_prompts(pipe, PROMPTS[:1], guidance_scale=1.0, max_sequence_length=16)
        refresh.buffer = {
            "chosen": torch.randn(6, 4, 8, 8),
            "rejected": torch.randn(6, 4, 8, 8),
            "prompt_embeds": cond.prompt_embeds.repeat(6, 1, 1),
            "pooled_prompt_embeds": cond.pooled_prompt_embeds.repeat(6, 1),
        }
        assert math.isfinite(refresh.train())
        drawn = torch.cat([u.view(2, -1) for u in seen], dim=1)
        assert len(seen) == 3 and torch.equal(drawn[0], drawn[1])  # a pair's two latents share their level
        if levels is None:
            assert len(drawn[0].unique()) == drawn.shape[1]  # uniform draws: all distinct
        else:
            assert drawn.shape[1] == 12 and all(min(abs(u - v) for v in levels) < 1e-6 for u in drawn[0].tolist())


def test_latent_reward_shares_the_noise_draw_within_a_prompt(tiny_sd3_dir):
    """Common random numbers: samples of one prompt see one noise draw, so equal latents of a prompt score equal and
    a group's reward differences come from its images; different prompts get their own draws."""
    pipe, model = build(tiny_sd3_dir)
    reward = DiNaLatentReward(model, noise_level=0.9, seed=1)
    latents = torch.randn(1, 4, 8, 8).repeat(4, 1, 1, 1)
    prompts = ["a red circle", "a red circle", "two cats", "two cats"]
    cond = encode_prompts(pipe, prompts, guidance_scale=1.0, max_sequence_length=16)
    shared = reward(latents, cond.prompt_embeds, cond.pooled_prompt_embeds, prompts=prompts)
    assert shared[0] == shared[1] and shared[2] == shared[3]
    cond_same = encode_prompts(pipe, ["a red circle"] * 4, guidance_scale=1.0, max_sequence_length=16)
    redrawn = reward(latents, cond_same.prompt_embeds, cond_same.pooled_prompt_embeds, prompts=["p", "p", "q", "q"])
    assert redrawn[0] == redrawn[1] and redrawn[1] != redrawn[2]  # same inputs, another draw for "q"
    independent = reward(latents, cond.prompt_embeds, cond.pooled_prompt_embeds)
    assert independent[0] != independent[1]


def test_reward_refresh_adversarial_pairs(tiny_sd3_dir):
    """`adversarial_steps`: each labelled sample is pushed up the reward's gradient (steps of the given RMS) and
    paired with its push: a tie (0.5) when the labeler sees no difference, else the better side wins; training on
    the ties flattens the reward along the push."""
    from modeling_dina.alignment.refresh import RewardRefresh

    pipe, model = build(tiny_sd3_dir)
    by_prompt = lambda images, prompts: [float(len(p)) for p in prompts]  # noqa: E731  (blind to the image)
    with pytest.raises(ValueError, match="adversarial"):
        RewardRefresh(model, by_prompt, PROMPTS, adversarial_steps=-1)
    sampler = dict(num_inference_steps=2, guidance_scale=1.0, max_sequence_length=16)
    refresh = RewardRefresh(
        model,
        by_prompt,
        PROMPTS,
        every=1,
        num_prompts=2,
        per_prompt=2,
        train_steps=0,
        sample_kwargs=sampler,
        noise_levels=[0.0],
        adversarial_steps=2,
        adversarial_step_size=0.1,
    )
    metrics = refresh(pipe, 1)
    pairs = refresh.buffer
    assert metrics["refresh/adversarial_ties"] == 1.0 and metrics["refresh/pairs"] == 4  # no pair within a prompt
    assert torch.equal(pairs["labels"], torch.full((4,), 0.5))
    step_rms = (pairs["rejected"] - pairs["chosen"]).flatten(1).pow(2).mean(1).sqrt()
    assert ((step_rms > 0.1) & (step_rms <= 0.2 + 1e-6)).all()  # two steps of RMS 0.1

    def scores(x):
        embeds, pooled = pairs["prompt_embeds"], pairs["pooled_prompt_embeds"]
        return model.score_clean(x, embeds, pooled, noise_level=0.0, noise=torch.zeros_like(x)).rewards

    with torch.no_grad():
        gap = scores(pairs["rejected"]) - scores(pairs["chosen"])
    assert (gap > 0).all()  # the push climbed the reward
    refresh.train_steps, refresh.optimizer.param_groups[0]["lr"] = 30, 3e-3
    refresh.train()
    with torch.no_grad():
        assert (scores(pairs["rejected"]) - scores(pairs["chosen"])).abs().mean() < gap.mean() / 2
    brightness = lambda images, prompts: [float(np.asarray(im).mean()) for im in images]  # noqa: E731
    refresh.labeler = brightness
    pairs, metrics = refresh.label_pairs(pipe, pairs["chosen"], [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[2]])
    adversarial = pairs["labels"][-4:]

    def decoded(x):
        return torch.tensor(brightness(decode_latents(pipe, x), [""] * len(x)))

    expected = 0.5 + 0.5 * torch.sign(decoded(pairs["chosen"][-4:]) - decoded(pairs["rejected"][-4:]))
    assert torch.equal(adversarial, expected) and len(pairs["labels"]) == 1 + 4
    assert torch.equal(pairs["labels"][:1], torch.ones(1)) and metrics["refresh/adversarial_ties"] < 1
