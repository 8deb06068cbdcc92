"""DiNa-LRM as a verl-omni reward, in process.

verl-omni calls an image reward as `compute_score(data_source, solution_image, ground_truth, extra_info, **kwargs)`
(awaited when it is a coroutine function) and reads `{"score": float, ...}`; for SD3.5 latent rollouts
(`output_type="latent"` or `"both"`) the clean latent is `extra_info["latents_clean"]` (or `solution_image` itself)
with `extra_info["prompt_embeds"]` / `["pooled_prompt_embeds"]` (other families: `["prompt_embeds_mask"]` where they
mask prompt tokens, no pooled vector), and `ground_truth` is the prompt. Its native reward
models are classes built as `cls(model_path=..., device=..., **executor.kwargs)` whose `infer(...)` the reward function
calls through the `reward_model` handle and whose `close()` runs when the model is put to sleep: `DiNaVerlReward`.

The answers equal the DRM HTTP v1 server's for the same `noise_seed` (`dina serve`, verl-omni's latent client), so a
recipe moves between in-process and served scoring without changing its rewards.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import threading

import PIL.Image
import torch

from . import MODEL_ENV, load_scoring_pipeline, resolve_setting

_models: dict[tuple, DiNaVerlReward] = {}
_models_lock = threading.Lock()


class DiNaVerlReward:
    """verl-omni native reward model: `DiNaVerlReward(model_path, device, **kwargs)`, `infer(...)`, `close()`.

    Args:
        model_path: DiNa model folder or Hub id (default: `DINA_REWARD_MODEL`).
        device: where the model runs. kwargs: `dtype` (e.g. `"bfloat16"`).
    """

    def __init__(self, model_path: str | None = None, device=None, dtype=None, **kwargs):
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}; DiNaVerlReward takes model_path, device, dtype.")
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.pipe = load_scoring_pipeline(model_path, device, dtype)
        self._lock = threading.Lock()  # verl may call infer from several threads; the model runs one call at a time

    def infer(
        self,
        solution_image=None,
        prompt: str | None = None,
        *,
        latents=None,
        prompt_embeds=None,
        pooled_prompt_embeds=None,
        prompt_embeds_mask=None,
        noise_level: float | None = None,
        noise_seed: int | None = None,
    ) -> float:
        """Raw reward of one sample: clean `latents` `(C, h, w)` (with the prompt encoding as the family has it:
        `pooled_prompt_embeds` for SD3 / FLUX, optionally `prompt_embeds_mask` for Qwen-Image / Z-Image; or `prompt`),
        else `solution_image` (a `(C, H, W)` float tensor in [0, 1] or a PIL image) with `prompt`. With `noise_seed`
        the noise is `torch.randn((1, C, h, w), generator=torch.Generator("cpu").manual_seed(noise_seed))`."""
        generator = None if noise_seed is None else torch.Generator("cpu").manual_seed(int(noise_seed))
        kwargs = dict(noise_level=noise_level, generator=generator)
        with self._lock:
            if latents is not None:
                if prompt_embeds is None:
                    kwargs["prompt"] = prompt
                else:
                    kwargs["prompt_embeds"] = _batched(prompt_embeds, 3)
                    kwargs["pooled_prompt_embeds"] = _batched(pooled_prompt_embeds, 2)
                    kwargs["prompt_embeds_mask"] = _batched(prompt_embeds_mask, 2)
                out = self.pipe(latents=_batched(latents, 4), **kwargs)
            else:
                if solution_image is None or prompt is None:
                    raise ValueError("give `latents` (+ prompt encoding or prompt), or `solution_image` and `prompt`.")
                image = solution_image if isinstance(solution_image, PIL.Image.Image) else [solution_image]
                out = self.pipe(prompt, images=image, **kwargs)
        return float(out.rewards[0])

    def close(self) -> None:
        self.pipe = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


async def compute_score(
    data_source,
    solution_image,
    ground_truth,
    extra_info=None,
    *,
    reward_model=None,
    model_path: str | None = None,
    device=None,
    noise_level: float | None = None,
    noise_seed: int | None = 0,
    score_scale: float = 1.0,
    score_bias: float = 0.0,
    **kwargs,
) -> dict:
    """`{"score": raw * score_scale + score_bias, "drm_raw_score": raw}` for one rollout sample.

    Scores the clean latent when the rollout provides one (`extra_info["latents_clean"]`, or a `solution_image`
    with the model's latent channels), else the decoded image; `ground_truth` is the prompt. `reward_model` is
    verl-omni's handle on a native `DiNaVerlReward`; without it a process-wide model is loaded once from
    `model_path` (or `DINA_REWARD_MODEL`) on `device`. `noise_level` defaults to the model's level for latents (0.4)
    or images; `noise_seed=0` is verl-omni's DRM client default.
    """
    extra_info = extra_info or {}
    model = reward_model if reward_model is not None else await asyncio.to_thread(_shared_model, model_path, device)
    latents = extra_info.get("latents_clean")
    channels = _latent_channels(model)
    if latents is None and isinstance(solution_image, torch.Tensor) and solution_image.shape[-3] == channels:
        latents = solution_image
    request = dict(prompt=ground_truth, noise_level=noise_level, noise_seed=noise_seed)
    if latents is not None:
        request.update(
            latents=latents,
            prompt_embeds=extra_info.get("prompt_embeds"),
            pooled_prompt_embeds=extra_info.get("pooled_prompt_embeds"),
            prompt_embeds_mask=extra_info.get("prompt_embeds_mask"),
        )
    else:
        request["solution_image"] = solution_image
    if reward_model is not None:
        raw = reward_model.infer(**request)
        raw = await raw if inspect.isawaitable(raw) else raw
    else:
        raw = await asyncio.to_thread(model.infer, **request)
    raw = float(raw)
    return {"score": raw * score_scale + score_bias, "drm_raw_score": raw}


def _shared_model(model_path, device) -> DiNaVerlReward:
    # Keyed by the resolved path: a change of `DINA_REWARD_MODEL` within a process loads the new model.
    model_path = resolve_setting(model_path, MODEL_ENV, "reward model")
    key = (model_path, str(device))
    with _models_lock:
        if key not in _models:
            _models[key] = DiNaVerlReward(model_path, device)
        return _models[key]


def _latent_channels(model) -> int | None:
    pipe = getattr(model, "pipe", None)  # verl-omni's handle on a native model does not expose it
    return pipe.reward_model.backbone.latent_channels if pipe is not None else None


def _batched(tensor: torch.Tensor | None, ndim: int) -> torch.Tensor | None:
    if tensor is None:  # the family has no such tensor (pooled: Qwen-Image, Z-Image) or it was not sent (mask)
        return None
    tensor = torch.as_tensor(tensor)
    return tensor[None] if tensor.ndim == ndim - 1 else tensor


__all__ = ["DiNaVerlReward", "compute_score"]
