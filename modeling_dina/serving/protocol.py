"""The wire formats of `dina serve`: DRM HTTP v1 (safetensors in, JSON out) and the text + image route.

DRM HTTP v1, `POST /v1/score` with `content-type: application/octet-stream` and `x-drm-protocol-version: 1`; the body
is a safetensors file holding

| tensor | shape | dtype |
|---|---|---|
| `latents` | `(B, C, h, w)` clean VAE latents (shifted and scaled) | float |
| `prompt_embeds` | `(B, L, D)` | float |
| `pooled_prompt_embeds` (SD3, FLUX: required; others: absent) | `(B, P)` | float |
| `encoder_attention_mask` (optional; Qwen-Image, Z-Image only) | `(B, L)`, true / 1 for real tokens | bool or int |
| `u` | `(1,)` or `(B,)`, the noise level in [0, 1] | float32 |
| `seeds` (optional) | `(B,)` | int64 |

and the answer is `{"protocol_version": "1", "raw_scores": [B floats]}`. The prompt tensors are the family's encoding
as `DiNaRewardPipeline.encode_prompts` gives it; a masked family without `encoder_attention_mask` reads every token.

Noise rule: with `seeds`, sample i is noised with
`torch.randn(latents[i:i+1].shape, generator=torch.Generator("cpu").manual_seed(seeds[i]))` (fp32, then moved and
cast), so `pipe(latents=..., prompt_embeds=..., pooled_prompt_embeds=..., prompt_embeds_mask=..., noise=that,
noise_level=u)` reproduces a served score in process. Without `seeds`, the pipeline's deterministic default for the
request (`DiNaRewardPipeline.default_noise`), or a fresh draw per request when the server runs with `--random-noise`.

Every malformed request raises `RequestError`, which the app answers with a 4xx JSON error naming the field.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass

import PIL.Image
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors

PROTOCOL_VERSION = "1"
PROTOCOL_HEADER = "x-drm-protocol-version"
REQUIRED_TENSORS = ("latents", "prompt_embeds", "u")  # and `pooled_prompt_embeds` where the family has one
OPTIONAL_TENSORS = ("pooled_prompt_embeds", "encoder_attention_mask", "seeds")
# Pillow refuses larger images anyway; a smaller cap keeps one request from taking the server's memory.
MAX_IMAGE_PIXELS = 4096 * 4096


class RequestError(Exception):
    """A bad request: `status` (4xx), the `field` at fault and a message saying what is wrong."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(message)
        self.field, self.message, self.status = field, message, status

    def to_json(self) -> dict:
        return {"error": {"field": self.field, "message": self.message}}


@dataclass(frozen=True)
class ModelSpec:
    """What the served model reads, to validate requests before they reach it (`None`: not bounded / not checked)."""

    latent_channels: int
    patch_size: int
    max_latent_side: int | None
    text_width: int | None
    pooled_width: int | None
    uses_pooled: bool = True  # the family reads a pooled prompt vector (SD3, FLUX)
    uses_mask: bool = False  # the family masks padded prompt tokens (Qwen-Image, Z-Image)

    @classmethod
    def from_model(cls, model) -> ModelSpec:
        backbone = model.backbone
        max_patches = backbone.max_patches
        text_width, pooled_width = backbone.prompt_widths(model.config.backbone_config or {})
        return cls(
            latent_channels=backbone.latent_channels,
            patch_size=backbone.patch_size,
            max_latent_side=max_patches * backbone.patch_size if max_patches else None,
            text_width=text_width,
            pooled_width=pooled_width,
            uses_pooled=backbone.uses_pooled,
            uses_mask=backbone.uses_text_mask,
        )


@dataclass
class LatentRequest:
    """A validated DRM request: fp32 CPU tensors (the mask bool), `u` of shape `(B,)`, `seeds` `(B,)` or None;
    `pooled_prompt_embeds` only for families with a pooled vector, `encoder_attention_mask` only when sent."""

    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None
    u: torch.Tensor
    seeds: torch.Tensor | None
    encoder_attention_mask: torch.Tensor | None = None


def check_protocol_version(value: str | None) -> None:
    if value is None:
        raise RequestError(PROTOCOL_HEADER, f"missing header `{PROTOCOL_HEADER}` (this server speaks version 1).", 400)
    if value.strip() != PROTOCOL_VERSION:
        raise RequestError(PROTOCOL_HEADER, f"unknown protocol version {value!r}; this server speaks version 1.", 400)


def parse_drm_body(body: bytes, spec: ModelSpec) -> LatentRequest:
    """Decode and validate a DRM v1 body (never unpickles: safetensors holds only raw tensors)."""
    try:
        tensors = load_tensors(body)
    except (SafetensorError, ValueError, OverflowError) as err:
        raise RequestError("body", f"the body is not a safetensors file ({err}).", 400) from err
    required = (*REQUIRED_TENSORS, "pooled_prompt_embeds") if spec.uses_pooled else REQUIRED_TENSORS
    missing = [name for name in required if name not in tensors]
    if missing:
        raise RequestError(missing[0], f"missing tensor `{missing[0]}` (required: {', '.join(required)}).")
    unknown = sorted(set(tensors) - set(REQUIRED_TENSORS) - set(OPTIONAL_TENSORS))
    if unknown:
        raise RequestError(unknown[0], f"unexpected tensor `{unknown[0]}`.")
    latents = _float_tensor(tensors, "latents", 4)
    batch = latents.shape[0]
    if batch == 0:
        raise RequestError("latents", "`latents` holds no sample (batch size 0).")
    check_latents(latents, spec)
    embeds = _float_tensor(tensors, "prompt_embeds", 3)
    pooled = _pooled(tensors, spec)
    for name, value, width in (
        ("prompt_embeds", embeds, spec.text_width),
        ("pooled_prompt_embeds", pooled, spec.pooled_width),
    ):
        if value is None:
            continue
        if value.shape[0] != batch:
            raise RequestError(name, f"`{name}` has {value.shape[0]} rows for {batch} latents.")
        if width is not None and value.shape[-1] != width:
            raise RequestError(name, f"`{name}` has width {value.shape[-1]}; the model reads {width}.")
    mask = _mask(tensors, spec, tuple(embeds.shape[:2]))
    u = _float_tensor(tensors, "u", 1)
    if u.shape[0] not in (1, batch):
        raise RequestError("u", f"`u` has {u.shape[0]} values for {batch} latents: give 1 or {batch}.")
    if ((u < 0) | (u > 1)).any():
        raise RequestError("u", f"`u` must lie in [0, 1], got {u.tolist()}.")
    seeds = tensors.get("seeds")
    if seeds is not None:
        if seeds.dtype != torch.int64 or seeds.ndim != 1:
            raise RequestError("seeds", f"`seeds` must be int64 of shape [B], got {seeds.dtype} {list(seeds.shape)}.")
        if seeds.shape[0] != batch:
            raise RequestError("seeds", f"`seeds` has {seeds.shape[0]} values for {batch} latents.")
    return LatentRequest(latents, embeds, pooled, u.expand(batch).clone(), seeds, mask)


def _pooled(tensors: dict, spec: ModelSpec) -> torch.Tensor | None:
    """The pooled vector where the family reads one (its presence was checked); refused where it reads none, as the
    pipeline refuses it, rather than silently dropped."""
    if spec.uses_pooled:
        return _float_tensor(tensors, "pooled_prompt_embeds", 2)
    if "pooled_prompt_embeds" in tensors:
        raise RequestError("pooled_prompt_embeds", "this model reads no pooled prompt embedding: drop the tensor.")
    return None


def _mask(tensors: dict, spec: ModelSpec, shape: tuple[int, int]) -> torch.Tensor | None:
    """`encoder_attention_mask` as bool `(B, L)` (`shape`, that of `prompt_embeds`): bool, or integers 0 / 1."""
    name = "encoder_attention_mask"
    mask = tensors.get(name)
    if mask is None:
        return None
    if not spec.uses_mask:
        raise RequestError(name, f"this model attends to every prompt token: it takes no `{name}`.")
    if mask.is_floating_point() or mask.is_complex():
        raise RequestError(name, f"`{name}` must be bool or integer (1 for real tokens), got {mask.dtype}.")
    if tuple(mask.shape) != shape:
        raise RequestError(name, f"`{name}` has shape {list(mask.shape)}; `prompt_embeds` make it {list(shape)}.")
    if mask.dtype != torch.bool and ((mask != 0) & (mask != 1)).any():
        raise RequestError(name, f"`{name}` must hold 0 or 1 (1 for real tokens).")
    return mask.bool()


def check_latents(latents: torch.Tensor, spec: ModelSpec, field: str = "latents") -> None:
    if latents.shape[1] != spec.latent_channels:
        raise RequestError(
            field, f"`{field}` have {latents.shape[1]} channels; the model reads {spec.latent_channels}."
        )
    height, width = latents.shape[-2:]
    patch, side = spec.patch_size, spec.max_latent_side or max(height, width)
    if height % patch or width % patch or min(height, width) < patch or max(height, width) > side:
        raise RequestError(
            field, f"`{field}` are {height}x{width}; sides must be multiples of {patch} in [{patch}, {side}]."
        )


def _float_tensor(tensors: dict, name: str, ndim: int) -> torch.Tensor:
    value = tensors[name]
    if value.ndim != ndim:
        raise RequestError(name, f"`{name}` must have rank {ndim}, got shape {list(value.shape)}.")
    if not value.is_floating_point():
        raise RequestError(name, f"`{name}` must be a float tensor, got {value.dtype}.")
    value = value.float()
    if not torch.isfinite(value).all():
        raise RequestError(name, f"`{name}` contains NaN or infinite values.")
    return value


def seeded_noise(latents: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """The DRM v1 noise rule: sample i's draw from a CPU generator seeded with `seeds[i]`, in fp32."""
    return torch.cat(
        [
            torch.randn(latents[i : i + 1].shape, generator=torch.Generator("cpu").manual_seed(int(seed)))
            for i, seed in enumerate(seeds.tolist())
        ]
    )


# ------------------------------------------------------------------------------------------- text + image route


@dataclass
class ImageRequest:
    """A validated `/v1/score_images` request: one prompt per image, decoded RGB images, one noise level."""

    prompts: list[str]
    images: list[PIL.Image.Image]
    noise_level: float | None
    seeds: list[int] | None


def parse_images_json(payload) -> ImageRequest:
    """`{"prompts": [...] or "prompt": "...", "images": [base64 PNG/JPEG, ...], "noise_level"?: u, "seeds"?: [...]}`."""
    if not isinstance(payload, dict):
        raise RequestError("body", "the JSON body must be an object.", 400)
    images = payload.get("images")
    if not isinstance(images, list) or not images or not all(isinstance(i, str) for i in images):
        raise RequestError("images", "`images` must be a non-empty list of base64-encoded PNG or JPEG strings.")
    decoded = [decode_image(_b64decode(data, f"images[{i}]"), f"images[{i}]") for i, data in enumerate(images)]
    return _image_request(
        payload.get("prompts", payload.get("prompt")), decoded, payload.get("noise_level"), payload.get("seeds")
    )


def parse_images_form(prompts: list[str], files: list[tuple[str, bytes]], noise_level, seeds) -> ImageRequest:
    """Multipart: `prompt` (once, or once per image) fields, `images` file parts, optional `noise_level` / `seeds`."""
    if not files:
        raise RequestError("images", "no `images` file parts in the form.")
    decoded = [decode_image(data, f"images[{i}]") for i, (_, data) in enumerate(files)]
    level = None
    if noise_level is not None:
        try:
            level = float(noise_level)
        except ValueError as err:
            raise RequestError("noise_level", f"`noise_level` must be a number, got {noise_level!r}.") from err
    seed_list = None
    if seeds:
        try:
            seed_list = [int(s) for s in seeds]
        except ValueError as err:
            raise RequestError("seeds", f"`seeds` must be integers, got {seeds!r}.") from err
    return _image_request(prompts[0] if len(prompts) == 1 else prompts, decoded, level, seed_list)


def decode_image(data: bytes, field: str) -> PIL.Image.Image:
    """Bytes of a PNG or JPEG -> a loaded RGB PIL image (decoding errors are the client's)."""
    try:
        with PIL.Image.open(io.BytesIO(data)) as image:
            if image.format not in ("PNG", "JPEG"):
                raise RequestError(field, f"`{field}` is {image.format}, not PNG or JPEG.")
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise RequestError(field, f"`{field}` is {image.width}x{image.height}, over {MAX_IMAGE_PIXELS} pixels.")
            return image.convert("RGB")
    except (PIL.UnidentifiedImageError, OSError, PIL.Image.DecompressionBombError) as err:
        raise RequestError(field, f"`{field}` is not a readable PNG or JPEG image ({err}).") from err


def _b64decode(data: str, field: str) -> bytes:
    if data.startswith("data:") and "," in data:  # a data URL
        data = data.split(",", 1)[1]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(field, f"`{field}` is not valid base64 ({err}).") from err


def _image_request(prompts, images, noise_level, seeds) -> ImageRequest:
    if isinstance(prompts, str):
        prompts = [prompts] * len(images)
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise RequestError("prompts", "`prompts` must be a string or a list of strings (`prompt` for one).")
    if len(prompts) != len(images):
        raise RequestError("prompts", f"{len(prompts)} prompts for {len(images)} images: give one, or one per image.")
    if noise_level is not None:
        if isinstance(noise_level, bool) or not isinstance(noise_level, (int, float)) or not 0 <= noise_level <= 1:
            raise RequestError("noise_level", f"`noise_level` must be a number in [0, 1], got {noise_level!r}.")
    if seeds is not None:
        if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise RequestError("seeds", "`seeds` must be a list of integers, one per image.")
        if len(seeds) != len(images):
            raise RequestError("seeds", f"{len(seeds)} seeds for {len(images)} images.")
    return ImageRequest(prompts, images, None if noise_level is None else float(noise_level), seeds)


__all__ = [
    "PROTOCOL_HEADER",
    "PROTOCOL_VERSION",
    "ImageRequest",
    "LatentRequest",
    "ModelSpec",
    "RequestError",
    "check_protocol_version",
    "parse_drm_body",
    "parse_images_form",
    "parse_images_json",
    "seeded_noise",
]
