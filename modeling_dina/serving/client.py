"""Clients of `dina serve`, with the call signatures of the in-process rewards, so switching is one line:

    reward_fn = make_reward_fn(pipe)                        # in process
    reward_fn = DiNaRemoteReward("http://127.0.0.1:8000")   # served
    scores, info = reward_fn(images, prompts, metadata)

`score_latents` speaks DRM HTTP v1 (what verl-omni's latent client sends). Nothing here pickles or unpickles: images
travel as PNG, tensors as safetensors, answers as JSON.
"""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import PIL.Image
import torch
from safetensors.torch import save as save_tensors

from .protocol import PROTOCOL_HEADER, PROTOCOL_VERSION


class DiNaRemoteReward:
    """`fn(images, prompts, metadata=None) -> (scores, info)` against a `dina serve` server, like `make_reward_fn`.

    Args:
        url: the server's base URL, e.g. `http://127.0.0.1:8000`.
        noise_level: the level images are scored at (default: the model's `noise_level_images`).
        normalized: return the normalised score (`(raw + 10) / 10`) rather than the raw reward.
        timeout: seconds per request.
    """

    def __init__(self, url: str, noise_level: float | None = None, *, normalized: bool = True, timeout: float = 120.0):
        self.url = url.rstrip("/")
        self.noise_level, self.normalized = noise_level, normalized
        self.client = httpx.Client(timeout=timeout)

    def __call__(self, images, prompts, metadata=None):
        pil_images = to_pil_images(images)
        payload = {
            "prompts": prompts if isinstance(prompts, str) else list(prompts),
            "images": [_png(i) for i in pil_images],
        }
        if self.noise_level is not None:
            payload["noise_level"] = self.noise_level
        answer = _check(self.client.post(f"{self.url}/v1/score_images", json=payload))
        rewards = np.asarray(answer["raw_scores"], dtype=np.float32)
        scores = np.asarray(answer["scores"], dtype=np.float32)
        return (scores if self.normalized else rewards), {"rewards": rewards}

    def score_latents(
        self, latents, prompt_embeds, pooled_prompt_embeds, noise_level, seeds=None, encoder_attention_mask=None
    ) -> torch.Tensor:
        """DRM v1: raw rewards `(B,)` of clean latents; `noise_level` a float or one per sample, `seeds` int per
        sample (the served noise is then `torch.randn(latents[i:i+1].shape, generator=Generator("cpu")
        .manual_seed(seeds[i]))`, reproducible in process). `pooled_prompt_embeds` is `None` for families without
        one (Qwen-Image, Z-Image), which may send `encoder_attention_mask` `(B, L)` instead."""
        return score_latents(
            self.client,
            self.url,
            latents,
            prompt_embeds,
            pooled_prompt_embeds,
            noise_level,
            seeds,
            encoder_attention_mask,
        )

    def healthy(self) -> bool:
        try:
            return self.client.get(f"{self.url}/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        self.client.close()


def drm_payload(
    latents, prompt_embeds, pooled_prompt_embeds, noise_level, seeds=None, encoder_attention_mask=None
) -> bytes:
    """A DRM v1 request body (safetensors); `pooled_prompt_embeds` and `encoder_attention_mask` are left out when
    `None` (the mask travels as bool)."""
    u = torch.as_tensor(noise_level, dtype=torch.float32).reshape(-1)
    tensors = {
        "latents": latents.detach().float().cpu().contiguous(),
        "prompt_embeds": prompt_embeds.detach().float().cpu().contiguous(),
        "u": u.contiguous(),
    }
    if pooled_prompt_embeds is not None:
        tensors["pooled_prompt_embeds"] = pooled_prompt_embeds.detach().float().cpu().contiguous()
    if encoder_attention_mask is not None:
        tensors["encoder_attention_mask"] = torch.as_tensor(encoder_attention_mask).detach().bool().cpu().contiguous()
    if seeds is not None:
        tensors["seeds"] = torch.as_tensor(seeds, dtype=torch.int64).reshape(-1).contiguous()
    return save_tensors(tensors)


def score_latents(
    client: httpx.Client,
    url: str,
    latents,
    prompt_embeds,
    pooled_prompt_embeds,
    noise_level,
    seeds=None,
    encoder_attention_mask=None,
) -> torch.Tensor:
    body = drm_payload(latents, prompt_embeds, pooled_prompt_embeds, noise_level, seeds, encoder_attention_mask)
    headers = {"content-type": "application/octet-stream", PROTOCOL_HEADER: PROTOCOL_VERSION}
    answer = _check(client.post(f"{url.rstrip('/')}/v1/score", content=body, headers=headers))
    if answer.get("protocol_version") != PROTOCOL_VERSION:
        raise RuntimeError(f"DRM protocol mismatch: the server answered {answer.get('protocol_version')!r}.")
    return torch.tensor(answer["raw_scores"], dtype=torch.float32)


def to_pil_images(images) -> list[PIL.Image.Image]:
    """Flow-GRPO's image forms: a float `(N, 3, H, W)` tensor in [0, 1], a uint8 `(N, H, W, 3)` array, or PIL images.
    Float images are rounded to 8 bits (what a PNG holds)."""
    if isinstance(images, torch.Tensor):
        images = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] not in (1, 3, 4) or images.dtype != np.uint8:
            raise ValueError(f"numpy images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}.")
        return [PIL.Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image) for image in images]
    images = list(images)
    if not all(isinstance(image, PIL.Image.Image) for image in images):
        raise TypeError("images must be a tensor, a numpy array or a list of PIL images.")
    return images


def _png(image: PIL.Image.Image) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _check(response: httpx.Response) -> dict:
    if response.status_code != 200:
        raise RuntimeError(f"reward server answered HTTP {response.status_code}: {response.text}")
    return response.json()


__all__ = ["DiNaRemoteReward", "drm_payload", "score_latents", "to_pil_images"]
