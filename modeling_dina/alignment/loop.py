"""The alignment loop: steps of ReFL or GRPO with logging (`log.jsonl`, PNG curves), evaluation callbacks,
checkpoints (generator LoRA + optimizer + RNG + step) and resuming from them."""

from __future__ import annotations

import importlib
import json
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import StableDiffusion3Pipeline
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from ..modeling_dina import DiNaRewardModel
from .common import ParameterEMA, PretrainData, RewardMeter, StepContext
from .config import AlignmentConfig
from .dpo import dpo_step
from .grpo import grpo_step
from .raft import raft_step
from .refl import refl_step
from .reward_fns import DiNaLatentReward, make_pixel_reward_fn
from .sampling import (
    GENERATOR_ADAPTER,
    add_generator_lora,
    generator_lora_parameters,
    load_generator_lora,
    save_generator_lora,
)

logger = logging.getLogger(__name__)

STEP_FUNCTIONS = {"refl": refl_step, "grpo": grpo_step, "raft": raft_step, "dpo": dpo_step}
LOG_NAME = "log.jsonl"
CURVES_NAME = "curves.png"
CHECKPOINTS_DIR = "checkpoints"
FINAL_LORA_DIR = "lora"
BEST_LORA_DIR = "best"
STATE_NAME = "training_state.pt"
OPTIMIZER_NAME = "optimizer.pt"


def align(
    pipe: StableDiffusion3Pipeline,
    reward_fn: Callable,
    config: AlignmentConfig,
    *,
    eval_fn: Callable | None = None,
    pretrain_data: PretrainData | None = None,
    step_callback: Callable | None = None,
    resume: bool = False,
    progress: bool = True,
) -> list[dict]:
    """Fine-tune the generator LoRA of `pipe` against `reward_fn`; returns the log records.

    Args:
        pipe: the generator. A LoRA named `"generator"` is added unless present; it is the only thing trained
            (everything else, a DiNa reward sharing the transformer's blocks included, is frozen).
        reward_fn: `fn(latents, prompt_embeds, pooled_prompt_embeds[, prompts=...]) -> (B,)` rewards of clean latents,
            e.g. `DiNaLatentReward(model)`. ReFL needs it differentiable w.r.t. the latents.
        eval_fn: `fn(pipe, step) -> {metric: value}`, run at step 0 and every `config.eval_every` steps (and at the
            last step); its values are logged as `eval/<metric>`. With `ema_decay` it sees the EMA weights.
        pretrain_data: `fn(batch_size, generator) -> (clean latents, prompts)` of real data, for ReFL's
            flow-matching regulariser (`pretrain_weight`).
        step_callback: `fn(pipe, step) -> {metric: value}`, run after every step on the current (not the EMA) policy,
            its values logged, e.g. `RewardRefresh`; its `state_dict()` (when it has one) is checkpointed.
        resume: continue from the latest checkpoint in `config.output_dir` (from scratch if there is none).

    Writes to `config.output_dir`: `log.jsonl` (one record per step: reward mean/std, loss, KL, gradient norm, wall
    time of the step and of the reward part, peak memory, on the first step the reward part's FLOPs),
    `curves.png`, `checkpoints/step-NNNNNN/` every `checkpoint_every` steps and the final LoRA in `lora/` (diffusers
    format: `pipe.load_lora_weights(output_dir + "/lora")`).
    """
    prompts = config.load_prompts()
    out = Path(config.output_dir)
    log_path = out / LOG_NAME
    if log_path.exists() and not resume:
        raise FileExistsError(f"{out} holds a previous run; pass resume=True (--resume) or use another output_dir.")
    out.mkdir(parents=True, exist_ok=True)
    (out / "alignment_config.json").write_text(json.dumps(config.to_dict(), indent=2))

    ctx = prepare_context(pipe, reward_fn, config, pretrain_data)
    ctx.step_callback = step_callback
    stopper = EarlyStopping(config.early_stopping_metric, config.early_stopping_patience, out / BEST_LORA_DIR)
    start = 0
    checkpoint = latest_checkpoint(out) if resume else None
    if checkpoint is not None:
        start = load_checkpoint(checkpoint, ctx, stopper)
        logger.info("resuming from %s (step %d)", checkpoint, start)
    elif resume:
        logger.info("no checkpoint in %s: starting from scratch", out)
    records = _read_log(log_path, up_to=start) if checkpoint is not None else []
    _write_log(log_path, records)  # drops what was logged after the checkpoint

    if eval_fn is not None and config.eval_every and start == 0:
        record = {"step": 0, **_evaluate(eval_fn, ctx, 0)}
        stopper.observe(record, ctx)
        records.append(_append(log_path, record))
    step_fn = STEP_FUNCTIONS[config.method]
    device = pipe.transformer.device
    bar = tqdm(range(start + 1, config.steps + 1), initial=start, total=config.steps, disable=not progress)
    for step in bar:
        batch = [prompts[i] for i in torch.randint(len(prompts), (config.batch_size,), generator=ctx.generator)]
        meter = RewardMeter(device, count_flops=step == start + 1)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        began = time.perf_counter()
        record = {"step": step, **step_fn(ctx, batch, meter)}
        if step_callback is not None:
            record.update(step_callback(pipe, step) or {})
        record.update(step_time_s=time.perf_counter() - began, reward_time_s=meter.seconds, **_peak_memory(device))
        if meter.flops is not None:
            record["reward_flops"] = meter.flops
        stop = False
        if eval_fn is not None and config.eval_every and (step % config.eval_every == 0 or step == config.steps):
            record.update(_evaluate(eval_fn, ctx, step))
            stop = stopper.observe(record, ctx)
        records.append(_append(log_path, record))
        bar.set_postfix(reward=f"{record['reward_mean']:.4g}", loss=f"{record['loss']:.4g}")
        if config.checkpoint_every and step % config.checkpoint_every == 0:
            save_checkpoint(out, step, ctx, stopper)
            write_curves(records, out / CURVES_NAME)
        if stop:
            logger.info("early stop at step %d: best %s at step %d", step, stopper.metric, stopper.best_step)
            break
    if stopper.best_step is not None:
        load_generator_lora(pipe.transformer, out / BEST_LORA_DIR)  # the pipe ends with the LoRA it saves
        shutil.copytree(out / BEST_LORA_DIR, out / FINAL_LORA_DIR, dirs_exist_ok=True)
    else:
        with ctx.policy():
            save_generator_lora(pipe, out / FINAL_LORA_DIR)
    write_curves(records, out / CURVES_NAME)
    return records


class EarlyStopping:
    """Tracks the best value of `eval/<metric>` (higher is better), saves the LoRA evaluated there to `folder`, and
    says when `patience` evaluations in a row have not beaten it. Inactive when `metric` is None."""

    def __init__(self, metric: str | None, patience: int, folder: Path):
        self.metric, self.patience, self.folder = metric, patience, folder
        self.best: float | None = None
        self.best_step: int | None = None
        self.since_best = 0

    def observe(self, record: dict, ctx: StepContext) -> bool:
        if self.metric is None:
            return False
        key = f"eval/{self.metric}"
        if key not in record:
            raise KeyError(f"early stopping on {key!r}, but the evaluation logged only {sorted(record)}.")
        if self.best is None or record[key] > self.best:
            self.best, self.best_step, self.since_best = record[key], record["step"], 0
            with ctx.policy():
                save_generator_lora(ctx.pipe, self.folder)
        else:
            self.since_best += 1
        record["best_step"] = self.best_step
        return self.since_best >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "since_best": self.since_best}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_step, self.since_best = state["best"], state["best_step"], state["since_best"]


def run_alignment(
    config: AlignmentConfig, *, eval_fn: Callable | None = None, resume: bool = False, progress: bool = True
) -> list[dict]:
    """Load the components a config names (`pipeline`, `reward`/`pixel_reward`, `eval_fn`, on `device` in `dtype`)
    and run `align`; an `eval_fn` given here takes precedence over the config's."""
    if not config.pipeline or not config.reward:
        raise ValueError("the config must name a `pipeline` folder and a `reward` (DiNa folder or 'pixel').")
    dtype = getattr(torch, config.dtype) if config.dtype else None
    pipe = StableDiffusion3Pipeline.from_pretrained(config.pipeline, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    if config.device:
        pipe.to(config.device)
    if config.reward == "pixel":
        reward_fn = make_pixel_reward_fn(pipe, import_object(config.pixel_reward))
    else:
        model = DiNaRewardModel.from_pretrained(config.reward, base_model=pipe.transformer, dtype=dtype)
        reward_fn = DiNaLatentReward(model.to(pipe.transformer.device), config.reward_noise_level, seed=config.seed)
    if eval_fn is None and config.eval_fn:
        eval_fn = import_object(config.eval_fn)
    return align(pipe, reward_fn, config, eval_fn=eval_fn, resume=resume, progress=progress)


def import_object(path: str):
    """`"package.module:name"` -> the object."""
    module, sep, name = path.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"expected 'module:name', got {path!r}.")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ImportError(f"cannot import {path!r}: {err}") from err


def prepare_context(
    pipe: StableDiffusion3Pipeline, reward_fn: Callable, config: AlignmentConfig, pretrain_data=None
) -> StepContext:
    """What a step of `config.method` works on: the generator LoRA added (seeded) and alone trainable, its optimiser,
    the run's random generator and the sizes."""
    transformer = pipe.transformer
    if GENERATOR_ADAPTER not in (getattr(transformer, "peft_config", None) or {}):
        # peft draws the LoRA's A matrices from torch's global generator: seed it, or a run depends on what ran before.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            add_generator_lora(transformer, config.lora_rank, config.lora_alpha, config.lora_target_modules)
    # Freeze everything (a DiNa reward's backbone holds the shared blocks and both adapters), then the generator LoRA.
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
    if isinstance(reward_fn, DiNaLatentReward):
        reward_fn.model.requires_grad_(False)
    params = generator_lora_parameters(transformer)
    for param in params:
        param.requires_grad_(True)
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    sample = transformer.config.sample_size * pipe.vae_scale_factor
    if isinstance(reward_fn, DiNaLatentReward):
        max_sequence_length = config.max_sequence_length or reward_fn.model.config.max_sequence_length
    else:
        max_sequence_length = config.max_sequence_length or 256
    return StepContext(
        pipe=pipe,
        reward_fn=reward_fn,
        config=config,
        optimizer=torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay),
        params=params,
        generator=torch.Generator().manual_seed(config.seed),
        height=config.height or sample,
        width=config.width or sample,
        max_sequence_length=max_sequence_length,
        pretrain_data=pretrain_data,
        ema=ParameterEMA(params, config.ema_decay) if config.ema_decay is not None else None,
    )


def _evaluate(eval_fn: Callable, ctx: StepContext, step: int) -> dict[str, float]:
    with ctx.policy():
        return {f"eval/{k}": float(v) for k, v in eval_fn(ctx.pipe, step).items()}


def _peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20, "memory_kind": "cuda_allocated"}
    # CPU tensors bypass Python's allocator (tracemalloc misses them): report the process's peak resident set.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KiB elsewhere
    return {"peak_memory_mb": rss / (2**20 if sys.platform == "darwin" else 2**10), "memory_kind": "process_max_rss"}


# ----------------------------------------------------------------------------------------------- log and curves


def _append(path: Path, record: dict) -> dict:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    return record


def _read_log(path: Path, up_to: int) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as f:
        return [r for r in map(json.loads, filter(str.strip, f)) if r["step"] <= up_to]


def _write_log(path: Path, records: list[dict]) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def write_curves(records: list[dict], path: str | os.PathLike) -> None:
    """One PNG with the reward (mean and +-std) and every `eval/` metric against the step."""
    train = [r for r in records if "reward_mean" in r]
    metrics = sorted({k for r in records for k in r if k.startswith("eval/")})
    cols = min(1 + len(metrics), 4)
    rows = -(-(1 + len(metrics)) // cols)
    fig = Figure(figsize=(4.5 * cols, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[1 + len(metrics) :]:
        ax.set_visible(False)
    steps = [r["step"] for r in train]
    mean = [r["reward_mean"] for r in train]
    std = [r["reward_std"] for r in train]
    axes[0].plot(steps, mean, label="reward (batch mean)")
    axes[0].fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
    axes[0].set(xlabel="step", title="reward")
    for ax, metric in zip(axes[1:], metrics):
        points = [(r["step"], r[metric]) for r in records if metric in r]
        ax.plot(*zip(*points), marker="o")
        ax.set(xlabel="step", title=metric.removeprefix("eval/"))
    fig.savefig(path, dpi=100)


# ----------------------------------------------------------------------------------------------- checkpoints


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint folder with the highest step, or None."""
    folder = Path(output_dir) / CHECKPOINTS_DIR
    found = sorted(folder.glob("step-*")) if folder.is_dir() else []
    return found[-1] if found else None


def save_checkpoint(
    output_dir: str | os.PathLike, step: int, ctx: StepContext, stopper: EarlyStopping | None = None
) -> Path:
    """Write `checkpoints/step-NNNNNN/`: the generator LoRA (diffusers format), the optimizer, the step and the RNG
    states (the run's generator, the reward's noise generator if it has one, torch's global ones). Written to a
    temporary folder first, so an interrupted save leaves no half checkpoint."""
    folder = Path(output_dir) / CHECKPOINTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".tmp-"))
    save_generator_lora(ctx.pipe, tmp)
    torch.save(ctx.optimizer.state_dict(), tmp / OPTIMIZER_NAME)
    reward_generator = getattr(ctx.reward_fn, "generator", None)
    state = {
        "step": step,
        "generator": ctx.generator.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if isinstance(reward_generator, torch.Generator):
        state["reward_generator"] = reward_generator.get_state()
    if ctx.ema is not None:
        state["ema"] = ctx.ema.shadow
    if stopper is not None:
        state["early_stopping"] = stopper.state_dict()
    if hasattr(ctx.step_callback, "state_dict"):
        state["step_callback"] = ctx.step_callback.state_dict()
    torch.save(state, tmp / STATE_NAME)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def load_checkpoint(folder: str | os.PathLike, ctx: StepContext, stopper: EarlyStopping | None = None) -> int:
    """Restore what `save_checkpoint` wrote into a prepared run; returns the step."""
    folder = Path(folder)
    load_generator_lora(ctx.pipe.transformer, folder)
    ctx.optimizer.load_state_dict(torch.load(folder / OPTIMIZER_NAME, weights_only=True))
    state = torch.load(folder / STATE_NAME, weights_only=True)
    ctx.generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    reward_generator = getattr(ctx.reward_fn, "generator", None)
    if "reward_generator" in state:
        if not isinstance(reward_generator, torch.Generator):
            raise ValueError(f"{folder} holds a reward noise generator state but the reward function has none.")
        reward_generator.set_state(state["reward_generator"])
    if ctx.ema is not None:
        if "ema" not in state:
            raise ValueError(f"{folder} holds no policy EMA but the run keeps one (`ema_decay`).")
        ctx.ema.shadow = [t.clone() for t in state["ema"]]
    if stopper is not None and "early_stopping" in state:
        stopper.load_state_dict(state["early_stopping"])
    if hasattr(ctx.step_callback, "load_state_dict"):
        if "step_callback" not in state:
            raise ValueError(
                f"{folder} holds no state of the run's step callback ({type(ctx.step_callback).__name__})."
            )
        ctx.step_callback.load_state_dict(state["step_callback"])
    return int(state["step"])
