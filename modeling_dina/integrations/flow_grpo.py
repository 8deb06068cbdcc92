"""Reward functions for Flow-GRPO's `multi_score` (and DiffusionNFT, which shares it).

`flow_grpo/rewards.py` builds each registered reward as `score_functions[name](device)` (it passes `device` when the
function has such an argument) and calls the result as `fn(images, prompts, metadata) -> (scores, details)`, where
`images` is a float `(N, 3, H, W)` tensor in [0, 1] or a uint8 `(N, H, W, 3)` array, then weights each score. Register

    score_functions["dina"] = dina_score            # in process (model from DINA_REWARD_MODEL)
    score_functions["dina"] = dina_score_remote     # a `dina serve` server at DINA_REWARD_URL

`dina_latent_score` is the latent variant (the authors' latent fork hands the generator's clean latents instead of
decoded images, and may pass its prompt encoding along: pooled for SD3 / FLUX, a mask for Qwen-Image / Z-Image).
"""

from __future__ import annotations

from ..rewards import make_reward_fn
from . import URL_ENV, load_scoring_pipeline, resolve_setting


def dina_score(device, model: str | None = None, noise_level: float | None = None):
    """`fn(images, prompts, metadata) -> (scores, {})`: normalised DiNa scores, a float32 array `(N,)`."""
    reward_fn = make_reward_fn(load_scoring_pipeline(model, device), noise_level)

    def _fn(images, prompts, metadata):
        scores, _ = reward_fn(images, prompts, metadata)
        return scores, {}

    return _fn


def dina_latent_score(device, model: str | None = None, noise_level: float | None = None):
    """`fn(latents, prompts, metadata, prompt_embeds=None, pooled_prompt_embeds=None, prompt_embeds_mask=None) ->
    (scores, {})` on clean generator latents `(N, C, h, w)`. The noise is drawn per prompt text either way, so passing
    the rollout's prompt encoding (no text encoders run) gives the same scores as letting the pipeline encode
    `prompts`. An encoding without the pooled vector its family reads is ignored (the prompts are encoded)."""
    pipe = load_scoring_pipeline(model, device)
    needs_pooled = pipe.backbone_family.uses_pooled

    def _fn(latents, prompts, metadata, prompt_embeds=None, pooled_prompt_embeds=None, prompt_embeds_mask=None):
        prompts = list(prompts)
        if prompt_embeds is None or (needs_pooled and pooled_prompt_embeds is None):
            out = pipe(prompts, latents=latents, noise_level=noise_level)
        else:
            out = pipe(
                latents=latents,
                prompt_embeds=prompt_embeds,
                pooled_prompt_embeds=pooled_prompt_embeds,
                prompt_embeds_mask=prompt_embeds_mask,
                noise=pipe.default_noise(latents, prompt=prompts),
                noise_level=noise_level,
            )
        return out.scores.float().cpu().numpy(), {}

    return _fn


def dina_score_remote(device, url: str | None = None, noise_level: float | None = None):
    """The served twin of `dina_score`, for users of Flow-GRPO's remote rewards: same call, but images go as PNG in
    JSON to `dina serve` and nothing is pickled on either side. `device` is accepted for `multi_score` and unused."""
    from ..serving.client import DiNaRemoteReward  # httpx comes with the `serve` extra

    reward = DiNaRemoteReward(resolve_setting(url, URL_ENV, "reward server URL"), noise_level)

    def _fn(images, prompts, metadata):
        scores, _ = reward(images, prompts, metadata)
        return scores, {}

    return _fn


__all__ = ["dina_latent_score", "dina_score", "dina_score_remote"]
