"""One path from an image to the pixels DiNa-LRM reads: every reader of images (the reward pipeline, the training
cache, the baselines, the evaluation runner) goes through [`DiNaImageProcessor`], so the same file gives the same
latents whichever path it takes.

Decoding: file paths, bytes, `datasets.Image` cells, PIL images (any mode: 16-bit, palette, CMYK, grey, with or without
alpha), numpy arrays (uint8, uint16, float in [0, 1]) and torch tensors (uint8, float in [0, 1]). The EXIF orientation
is applied (a portrait phone photo is read upright) and transparency is composited over white.

Sizes: sides are multiples of `vae_scale_factor * patch_size` pixels and at most the transformer's position table
(`max_patches * patch_size * vae_scale_factor`). Scoring keeps an image's native size (downscaled only to fit the
table, then each side rounded down to the multiple); training fits each pair into a bucket. Resizing is a centre crop
to the target's aspect ratio followed by an antialiased bicubic resize ("crop"), or a stretch with a PIL filter
("stretch", the released LANCZOS recipe); a size that is already right is left untouched.
"""

from __future__ import annotations

import io
import math
import os

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config
from diffusers.image_processor import VaeImageProcessor
from PIL import ImageOps

# 16-bit images; older Pillow opens 16-bit PNGs as 32-bit mode "I" with the same 0..65535 range.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# EXIF orientations that swap width and height (transpose, rotate 90/270, transverse).
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION = 0x0112
RESIZE_MODES = ("crop", "stretch")


class DiNaImageProcessor(VaeImageProcessor):
    r"""
    Images of any kind -> `(N, 3, H, W)` pixels in [-1, 1] at a size the backbone accepts.

    Args:
        vae_scale_factor (`int`): pixels per latent cell (8 for SD3).
        patch_size (`int`): latent cells per transformer patch (2 for SD3); sizes are multiples of both.
        max_patches (`int`, *optional*): patches a side in the transformer's position table (SD3.5-M: 384).
        resample (`str`): the PIL filter of the "stretch" mode ("lanczos" as in the release).
    """

    @register_to_config
    def __init__(
        self,
        vae_scale_factor: int = 8,
        patch_size: int = 2,
        max_patches: int | None = None,
        resample: str = "lanczos",
        do_normalize: bool = True,
    ):
        super().__init__(vae_scale_factor=vae_scale_factor, resample=resample, do_normalize=do_normalize)

    @classmethod
    def from_backbone(cls, backbone, vae_scale_factor: int) -> DiNaImageProcessor:
        """The processor for a DiNa backbone read through a VAE with `vae_scale_factor`."""
        return cls(vae_scale_factor=vae_scale_factor, patch_size=backbone.patch_size, max_patches=backbone.max_patches)

    @property
    def multiple(self) -> int:
        """Pixels a side of one transformer patch: every size is a multiple of it."""
        return self.config.vae_scale_factor * self.config.patch_size

    @property
    def max_side(self) -> int | None:
        """The longest side the position table allows, in pixels (None: no cap)."""
        patches = self.config.max_patches
        return patches * self.multiple if patches else None

    # --------------------------------------------------------------------------------------------- sizes

    def scoring_size(self, height: int, width: int, where: str = "image") -> tuple[int, int]:
        """`(height, width)` an image is scored at: its own, fitted into the position table, rounded down to the
        multiple."""
        multiple = self.multiple
        if min(height, width) < multiple:
            raise ValueError(
                f"`{where}` is {width}x{height} pixels, smaller than one latent patch ({multiple}x{multiple} pixels)."
            )
        scale = min(1.0, self.max_side / max(height, width)) if self.max_side else 1.0
        size = (math.floor(height * scale / multiple) * multiple, math.floor(width * scale / multiple) * multiple)
        if min(size) < multiple:
            raise ValueError(
                f"`{where}` is {width}x{height} pixels: fitting its longer side into {self.max_side} pixels leaves "
                f"the shorter below one latent patch ({multiple} pixels)."
            )
        return size

    # -------------------------------------------------------------------------------------------- decoding

    def size_of(self, source, where: str = "image") -> tuple[int, int]:
        """`(height, width)` of an image as it will be read (EXIF orientation applied), without decoding a file."""
        if isinstance(source, (np.ndarray, torch.Tensor)):
            return tuple(int(v) for v in self.to_tensor(source, where).shape[-2:])
        with _opened(source, where) as image:
            width, height = image.size
            if image.getexif().get(_EXIF_ORIENTATION) in _SWAPPING_ORIENTATIONS:
                width, height = height, width
        return int(height), int(width)

    def to_tensor(self, source, where: str = "image") -> torch.Tensor:
        """Any supported image -> `(3, H, W)` float32 RGB in [0, 1], upright, alpha composited over white."""
        if isinstance(source, np.ndarray):
            return _array_to_tensor(source, where)
        if isinstance(source, torch.Tensor):
            return _tensor_to_rgb(source, where)
        try:
            with _opened(source, where) as image:
                image.load()
                return _pil_to_tensor(ImageOps.exif_transpose(image), where)
        except OSError as err:
            raise ValueError(f"`{where}`: the image could not be decoded ({err}).") from err

    def to_pil(self, source, where: str = "image") -> PIL.Image.Image:
        """Any supported image -> an 8-bit RGB PIL image, read as `to_tensor` reads it (for pixel-space scorers)."""
        return self.numpy_to_pil(self.pt_to_numpy(self.to_tensor(source, where)[None]))[0]

    # ------------------------------------------------------------------------------------------- resizing

    def fit(self, pixels: torch.Tensor, size: tuple[int, int], mode: str = "crop") -> torch.Tensor:
        """`(3, H, W)` pixels in [0, 1] -> `(3, *size)`: "crop" (centre crop to the aspect ratio, then an antialiased
        bicubic resize; keeps autograd) or "stretch" (the configured PIL filter on each channel)."""
        if mode not in RESIZE_MODES:
            raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}.")
        height, width = pixels.shape[-2:]
        target_h, target_w = size
        if (height, width) == (target_h, target_w):
            return pixels
        if mode == "stretch":
            return _pil_resize(pixels, size, self.config.resample)
        if width * target_h > height * target_w:  # too wide: crop the sides
            keep = round(height * target_w / target_h)
            pixels = pixels[..., (width - keep) // 2 : (width - keep) // 2 + keep]
        else:
            keep = round(width * target_h / target_w)
            pixels = pixels[..., (height - keep) // 2 : (height - keep) // 2 + keep, :]
        if tuple(pixels.shape[-2:]) == (target_h, target_w):
            return pixels
        resized = F.interpolate(pixels[None], size=size, mode="bicubic", antialias=True, align_corners=False)
        return resized[0].clamp(0, 1)

    def preprocess_images(
        self, images, sizes: list[tuple[int, int]] | tuple[int, int] | None = None, mode: str = "crop"
    ) -> torch.Tensor:
        """Images -> `(N, 3, H, W)` in [-1, 1] (or [0, 1] with `do_normalize=False`), each fitted to its size (one
        size for all, one per image, or None: the scoring size); all must end at one size."""
        images = as_image_list(images)
        if sizes is None or isinstance(sizes, tuple):
            sizes = [sizes] * len(images)
        pixels = []
        for i, (image, size) in enumerate(zip(images, sizes)):
            tensor = self.to_tensor(image, f"images[{i}]")
            pixels.append(self.fit(tensor, size or self.scoring_size(*tensor.shape[-2:], f"images[{i}]"), mode))
        if len({tuple(p.shape) for p in pixels}) > 1:
            raise ValueError("the images end at different sizes: score them in groups of one size.")
        batch = torch.stack(pixels)
        return self.normalize(batch) if self.config.do_normalize else batch


def as_image_list(images) -> list:
    """One image, a list of them, or a batch (NHWC numpy / NCHW torch) -> a list of single images."""
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


# ------------------------------------------------------------------------------------------------ helpers


def _opened(source, where: str) -> PIL.Image.Image:
    """`source` as an open PIL image (a context manager); paths, bytes and `datasets.Image` cells are opened."""
    if isinstance(source, PIL.Image.Image):
        return _Borrowed(source)
    if isinstance(source, dict) and {"bytes", "path"} & set(source):  # an undecoded datasets.Image cell
        source = source.get("bytes") if source.get("bytes") is not None else source.get("path")
        if source is None:
            raise ValueError(f"`{where}`: the image cell has neither bytes nor a path.")
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        source = os.fspath(source)
        if not os.path.isfile(source):
            raise FileNotFoundError(f"`{where}`: no such file {source!r}.")
    else:
        raise TypeError(
            f"`{where}` must be a PIL image, a file path, bytes, a numpy (H, W, C) array or a torch (C, H, W) tensor, "
            f"got {type(source).__name__}."
        )
    try:
        return PIL.Image.open(source)
    except (PIL.UnidentifiedImageError, OSError) as err:
        name = source if isinstance(source, str) else "the bytes"
        raise ValueError(f"`{where}`: {name!r} is not a readable image ({err}).") from err


class _Borrowed:
    """A caller's PIL image used as a context manager without closing it."""

    def __init__(self, image: PIL.Image.Image):
        self.image = image

    def __enter__(self) -> PIL.Image.Image:
        return self.image

    def __exit__(self, *exc) -> None:
        return None


def _pil_to_tensor(image: PIL.Image.Image, where: str) -> torch.Tensor:
    if image.mode in _SIXTEEN_BIT_MODES:
        array = np.asarray(image, dtype=np.float32) / 65535.0
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float32)
    else:
        alpha = "A" in image.getbands() or "transparency" in image.info
        array = np.asarray(image.convert("RGBA" if alpha else "RGB"), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return _tensor_to_rgb(tensor.movedim(-1, 0) if tensor.ndim == 3 else tensor, where)


def _array_to_tensor(array: np.ndarray, where: str) -> torch.Tensor:
    if array.ndim == 3 and array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"`{where}`: a numpy image must be (H, W) or (H, W, C) with C in 1, 3, 4; got {array.shape}.")
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    elif array.dtype == np.uint16:
        array = array.astype(np.float32) / 65535.0
    elif not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"`{where}`: numpy images must be uint8, uint16 or float in [0, 1], got {array.dtype}.")
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return _tensor_to_rgb(tensor.movedim(-1, 0) if tensor.ndim == 3 else tensor, where)


def _tensor_to_rgb(tensor: torch.Tensor, where: str) -> torch.Tensor:
    """`(H, W)` or `(C, H, W)` with C in 1, 3, 4, uint8 or float in [0, 1] -> `(3, H, W)` float; alpha over white."""
    if tensor.ndim == 2:
        tensor = tensor[None]
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3, 4):
        raise ValueError(f"`{where}`: a tensor image must be (C, H, W), C in 1, 3, 4; got {tuple(tensor.shape)}.")
    if tensor.dtype == torch.uint8:
        tensor = tensor.float() / 255.0
    elif not tensor.is_floating_point():
        raise TypeError(f"`{where}`: tensor images must be uint8 or float in [0, 1], got {tensor.dtype}.")
    else:
        if not torch.isfinite(tensor).all():
            raise ValueError(f"`{where}` contains NaN or infinite values.")
        low, high = tensor.min().item(), tensor.max().item()
        # A little slack for decoder round-off; a [-1, 1] or [0, 255] image is an error, not something to guess.
        if low < -0.01 or high > 1.01:
            raise ValueError(
                f"`{where}` has values in [{low:.3g}, {high:.3g}]; float images must lie in [0, 1] "
                "(map [-1, 1] images with (x + 1) / 2)."
            )
        tensor = tensor.clamp(0, 1)
    if tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    elif tensor.shape[0] == 4:
        rgb, alpha = tensor[:3], tensor[3:]
        tensor = rgb * alpha + (1 - alpha)
    return tensor


def _pil_resize(pixels: torch.Tensor, size: tuple[int, int], resample: str) -> torch.Tensor:
    """Each channel as a 32-bit float PIL image, resized with the named filter (no 8-bit rounding)."""
    if pixels.requires_grad:
        raise ValueError("the 'stretch' resize runs in PIL and cannot keep gradients; use 'crop'.")
    flt = getattr(PIL.Image.Resampling, resample.upper())
    channels = [
        np.asarray(PIL.Image.fromarray(c.numpy()).resize((size[1], size[0]), flt), dtype=np.float32)
        for c in pixels.detach().float().cpu()
    ]
    return torch.from_numpy(np.stack(channels)).clamp(0, 1).to(pixels.device)


__all__ = ["DiNaImageProcessor", "RESIZE_MODES", "as_image_list"]
