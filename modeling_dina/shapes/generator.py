"""The Shapes world's pretrained generator: a tiny SD3-architecture pipeline trained with rectified flow.

Text encoders stay frozen at random init; the VAE is trained first on rendered images, then the MMDiT
(SD3.5-style dual attention) on the VAE's latents of renders of the training prompts.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline
from PIL import Image
from tqdm.auto import tqdm

from ..tiny_sd3 import build_tiny_sd3_components
from .checker import check_many
from .grammar import ATTRIBUTES, all_prompts, alternate_kinds, parse_prompt, vocabulary
from .render import render_scene, sample_scene

__all__ = [
    "GENERATOR_DIR",
    "MAX_SEQUENCE_LENGTH",
    "build_untrained_pipeline",
    "evaluate_generator",
    "load_generator",
    "sample_images",
    "train_transformer",
    "train_vae",
]

logger = logging.getLogger(__name__)

GENERATOR_DIR = Path(__file__).parent / "assets" / "generator"
# Token budget of every text encoder: the longest prompt has 8 words plus CLIP's BOS/EOS. Pass it as the
# pipeline's `max_sequence_length` (its default of 256 would pad T5 and cost several times more).
MAX_SEQUENCE_LENGTH = 12


def build_untrained_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """The generator's architecture at random init: 4 MMDiT layers of width 128 (4 heads x 32; dual attention in
    blocks 0-1), patch 2, 16x16x4 latents of 64x64 images, a 4x-downsampling VAE and word-level tokenizers."""
    components = build_tiny_sd3_components(
        words=vocabulary(),
        seed=seed,
        num_layers=4,
        num_attention_heads=4,
        attention_head_dim=32,
        dual_attention_layers=(0, 1),
        latent_channels=4,
        clip_max_length=MAX_SEQUENCE_LENGTH,
        t5_max_length=MAX_SEQUENCE_LENGTH,
        clip_dim=32,
        t5_dim=64,
        vae_block_out_channels=(16, 32, 64),
        sample_size=16,
    )
    return StableDiffusion3Pipeline(**components)


def load_generator(
    device: str | torch.device | None = None, dtype: torch.dtype | None = None, path: str | Path | None = None
) -> StableDiffusion3Pipeline:
    """The shipped pretrained generator (or the one saved at `path`), loaded offline.

    Call it with `max_sequence_length=MAX_SEQUENCE_LENGTH` (see `sample_images`).
    """
    path = Path(path) if path is not None else GENERATOR_DIR
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"no generator at {path}; build one with `python -m modeling_dina.shapes.build --stage generator`"
        )
    pipe = StableDiffusion3Pipeline.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device is not None else pipe


def _images_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def _random_renders(n: int, rng: np.random.Generator, prompts: Sequence[str]) -> list[Image.Image]:
    """Renders of random prompts, a third of them with one random violation, for layout and colour variety."""
    images = []
    for p in rng.choice(list(prompts), size=n):
        spec = parse_prompt(p)
        violations = [rng.choice(spec.attributes)] if rng.random() < 1 / 3 else []
        images.append(render_scene(sample_scene(spec, rng, violations)))
    return images


def _log(name: str, step: int, steps: int, loss: float, start: float) -> None:
    elapsed = time.perf_counter() - start
    logger.info("%s step %d/%d loss %.5f (%.2f steps/s, %.0f s)", name, step, steps, loss, step / elapsed, elapsed)


def _psnr(vae: AutoencoderKL, images: torch.Tensor) -> float:
    with torch.no_grad():
        rec = vae.decode(vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1)
    mse = ((rec - images) / 2).pow(2).mean().item()
    return 10 * math.log10(1.0 / mse)


def train_vae(
    vae: AutoencoderKL,
    *,
    steps: int = 600,
    batch_size: int = 32,
    lr: float = 1e-3,
    kl_weight: float = 1e-6,
    seed: int = 0,
    log_every: int = 50,
) -> dict:
    """Train the VAE on fresh renders (MSE + L1 + a small KL), then store its latent shift and scale in its config.

    Returns metrics: held-out PSNR (dB), steps/s, the latent statistics.
    """
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    prompts = all_prompts()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    warmup_cosine = lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine)
    vae.train()
    start = time.perf_counter()
    for step in range(1, steps + 1):
        x = _images_to_tensor(_random_renders(batch_size, rng, prompts))
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.mse_loss(rec, x) + F.l1_loss(rec, x) + kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            _log("vae", step, steps, loss.item(), start)
    steps_per_s = steps / (time.perf_counter() - start)
    vae.eval()

    held_out = _images_to_tensor(_random_renders(256, np.random.default_rng(seed + 10_000), prompts))
    with torch.no_grad():
        latents = vae.encode(held_out).latent_dist.mode()
    shift, scale = latents.mean().item(), 1.0 / latents.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return {"steps": steps, "steps_per_s": steps_per_s, "psnr_db": _psnr(vae, held_out), "shift": shift, "scale": scale}


@torch.no_grad()
def _encode_prompts(pipe: StableDiffusion3Pipeline, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    embeds, _, pooled, _ = pipe.encode_prompt(
        list(prompts), None, None, do_classifier_free_guidance=False, max_sequence_length=MAX_SEQUENCE_LENGTH
    )
    return embeds, pooled


@torch.no_grad()
def _latent_pool(
    vae: AutoencoderKL, prompts: Sequence[str], per_prompt: Sequence[int], rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled VAE latents of compliant renders: `per_prompt[i]` renders of `prompts[i]`, with prompt indices."""
    latents, index = [], []
    for i, (p, k) in enumerate(zip(prompts, per_prompt)):
        images = [render_scene(sample_scene(p, rng)) for _ in range(k)]
        z = vae.encode(_images_to_tensor(images)).latent_dist.mode()
        latents.append((z - vae.config.shift_factor) * vae.config.scaling_factor)
        index += [i] * k
    return torch.cat(latents), torch.tensor(index)


def train_transformer(
    pipe: StableDiffusion3Pipeline,
    prompts: Sequence[str],
    *,
    steps: int = 5000,
    batch_size: int = 32,
    lr: float = 1e-3,
    prompt_dropout: float = 0.1,
    ema_decay: float = 0.999,
    renders_per_prompt: tuple[int, int] = (64, 16),
    seed: int = 0,
    log_every: int = 250,
) -> dict:
    """Rectified-flow training of `pipe.transformer` on renders of `prompts` (count and relation prompts drawn
    half and half), SD3 convention: `x_s = (1 - s) x0 + s eps`, target `eps - x0`, timestep `1000 s`, `s`
    logit-normal. `prompt_dropout` of the conditions are the empty prompt's (for classifier-free guidance).
    The EMA weights (decay `ema_decay`) end up in the transformer. `renders_per_prompt` = (count, relation)
    renders pre-encoded per prompt. Returns metrics.
    """
    if not prompts:
        raise ValueError("prompts must not be empty")
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    kinds = [parse_prompt(p).kind for p in prompts]
    per_prompt = [renders_per_prompt[0] if k == "count" else renders_per_prompt[1] for k in kinds]
    latents, index = _latent_pool(pipe.vae, prompts, per_prompt, rng)
    embeds, pooled = _encode_prompts(pipe, [*prompts, ""])
    # Draw count and relation prompts half and half whatever their numbers (there are far more relations).
    kind_of_item = torch.tensor([kinds[i] == "count" for i in index.tolist()])
    weights = torch.where(kind_of_item, 0.5 / kind_of_item.sum(), 0.5 / (~kind_of_item).sum())

    model: SD3Transformer2DModel = pipe.transformer
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 200))
    model.train()
    start = time.perf_counter()
    running, since_log = 0.0, 0
    for step in range(1, steps + 1):
        items = torch.multinomial(weights, batch_size, replacement=True, generator=gen)
        x0 = latents[items]
        cond = index[items]
        cond = torch.where(torch.rand(batch_size, generator=gen) < prompt_dropout, len(prompts), cond)
        sigma = torch.sigmoid(torch.randn(batch_size, generator=gen))
        eps = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1)
        pred = model(
            hidden_states=(1 - s) * x0 + s * eps,
            encoder_hidden_states=embeds[cond],
            pooled_projections=pooled[cond],
            timestep=sigma * 1000,
        ).sample
        loss = F.mse_loss(pred, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - ema_decay)
        running, since_log = running + loss.item(), since_log + 1
        if step % log_every == 0 or step == steps:
            _log("transformer", step, steps, running / since_log, start)
            running, since_log = 0.0, 0
    steps_per_s = steps / (time.perf_counter() - start)
    model.load_state_dict(ema.state_dict())
    model.eval()
    return {"steps": steps, "steps_per_s": steps_per_s, "pool_size": len(index), "train_prompts": len(prompts)}


@torch.no_grad()
def sample_images(
    pipe: StableDiffusion3Pipeline,
    prompts: Sequence[str],
    *,
    seed: int = 0,
    num_inference_steps: int = 20,
    guidance_scale: float = 3.0,
    batch_size: int = 32,
    output_type: str = "pil",
    progress: bool = False,
) -> list[Image.Image] | torch.Tensor:
    """Generate one sample per prompt; sample `i` uses its own generator seeded `seed + i`, so results do not
    depend on `batch_size`. PIL images, or with `output_type="latent"` the clean latents as one tensor."""
    outputs = []
    for b in tqdm(range(0, len(prompts), batch_size), desc="sampling", disable=not progress):
        chunk = list(prompts[b : b + batch_size])
        generators = [torch.Generator(pipe.device).manual_seed(seed + b + i) for i in range(len(chunk))]
        outputs.append(
            pipe(
                prompt=chunk,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                max_sequence_length=MAX_SEQUENCE_LENGTH,
                generator=generators,
                output_type=output_type,
            ).images
        )
    return torch.cat(outputs) if output_type == "latent" else [image for batch in outputs for image in batch]


def _rates(results: list, specs: list) -> dict[str, float]:
    rates = {"overall": float(np.mean([r.overall for r in results]))}
    for attr in ATTRIBUTES:
        vals = [getattr(r, attr) for r, s in zip(results, specs) if attr in s.attributes]
        rates[attr] = float(np.mean(vals))
    for kind in ("count", "relation"):
        rates[f"overall_{kind}"] = float(np.mean([r.overall for r, s in zip(results, specs) if s.kind == kind]))
    return rates


def evaluate_generator(
    pipe: StableDiffusion3Pipeline,
    prompts: Sequence[str],
    *,
    num_samples: int = 512,
    best_of: int = 4,
    seed: int = 0,
    **sample_kwargs,
) -> dict[str, dict[str, float]]:
    """Checker compliance (overall, per attribute, per prompt kind) of `num_samples` generations over `prompts`
    (count and relation prompts alternate), for one random sample per prompt and for the best of `best_of` by
    checker score. `position` is over relation prompts only."""
    chosen = alternate_kinds(prompts, num_samples)
    specs = [parse_prompt(p) for p in chosen]
    repeated = [p for p in chosen for _ in range(best_of)]
    results = check_many(repeated, sample_images(pipe, repeated, seed=seed, **sample_kwargs))
    groups = [results[i * best_of : (i + 1) * best_of] for i in range(num_samples)]
    return {
        "random": _rates([g[0] for g in groups], specs),
        f"best_of_{best_of}": _rates([max(g, key=lambda r: r.score) for g in groups], specs),
    }
