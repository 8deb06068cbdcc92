"""Baseline text-to-image reward models behind one `Scorer` interface: CLIP / PickScore, ImageReward, HPSv2, HPSv3.

A scorer is called as `scorer(prompts, images)` and returns one reward per (prompt, image) pair, shape (B,).
The third-party baselines are imported lazily: install `image-reward`, `hpsv2` or `hpsv3` to use them.
"""

from __future__ import annotations

import abc
import importlib
from types import ModuleType

import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from .image_processing_dina import DiNaImageProcessor

_IMAGE_PROCESSOR = DiNaImageProcessor()


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _import_optional(module: str, package: str, scorer: str) -> ModuleType:
    """Imports an optional dependency or explains which pip package provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{scorer} needs the optional package `{package}`: pip install {package}") from error


def _parameter_count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


class Scorer(abc.ABC):
    """A reward model: `scorer(prompts, images) -> torch.Tensor` of shape (B,), float32 on the CPU.

    Subclasses set `name` and `num_parameters` and implement `_score_batch`; `__call__` validates the inputs,
    reads the images (`prepare_images`: by default RGB PIL images read by `DiNaImageProcessor`, upright and alpha
    over white, as the DiNa pipeline reads them) and splits them into batches of `batch_size` under `torch.no_grad`.
    `noise_level` is None for pixel-space baselines (latent reward models report the noise level they score at).
    """

    name: str
    num_parameters: int
    noise_level: float | None = None

    def __init__(self, name: str, num_parameters: int, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.name, self.num_parameters, self.batch_size = name, num_parameters, batch_size

    @abc.abstractmethod
    def _score_batch(self, prompts: list[str], images: list[Image.Image]) -> torch.Tensor:
        """Rewards of one batch, shape (B,)."""

    def prepare_images(self, images: list) -> list:
        """Images as `_score_batch` takes them: RGB PIL images read by the package's image processor."""
        return [_IMAGE_PROCESSOR.to_pil(image, f"{self.name}: images[{i}]") for i, image in enumerate(images)]

    @torch.no_grad()
    def __call__(self, prompts: list[str], images: list[Image.Image]) -> torch.Tensor:
        prompts, images = list(prompts), list(images)
        if len(prompts) != len(images):
            raise ValueError(f"{self.name}: got {len(prompts)} prompts but {len(images)} images")
        if not all(isinstance(prompt, str) for prompt in prompts):
            raise TypeError(f"{self.name}: prompts must be strings")
        if not all(isinstance(image, Image.Image) for image in images):
            raise TypeError(f"{self.name}: images must be PIL images")
        images = self.prepare_images(images)
        rewards = []
        for start in range(0, len(images), self.batch_size):
            stop = start + self.batch_size
            rewards.append(self._score_batch(prompts[start:stop], images[start:stop]).float().cpu().reshape(-1))
        return torch.cat(rewards) if rewards else torch.empty(0)


class CLIPScorer(Scorer):
    """CLIP-family reward: `mode="clip"` gives 100 * cosine (CLIP score), `"pickscore"` gives logit_scale * cosine.

    PickScore is `CLIPScorer.from_pretrained("yuvalkirstain/PickScore_v1",
    processor="laion/CLIP-ViT-H-14-laion2B-s32B-b79K", mode="pickscore")`.
    """

    MODES = ("clip", "pickscore")

    def __init__(
        self,
        model: CLIPModel,
        processor: CLIPProcessor,
        *,
        mode: str = "clip",
        name: str | None = None,
        batch_size: int = 32,
    ):
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        super().__init__(name or mode, _parameter_count(model), batch_size)
        self.model, self.processor, self.mode = model.eval(), processor, mode

    @classmethod
    def from_pretrained(
        cls,
        repo_or_path: str,
        *,
        processor: str | None = None,
        mode: str = "clip",
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        name: str | None = None,
        batch_size: int = 32,
    ) -> CLIPScorer:
        """Loads the model from `repo_or_path` and the processor from `processor` (default: the same place)."""
        model = CLIPModel.from_pretrained(repo_or_path, dtype=dtype).to(device or _default_device())
        clip_processor = CLIPProcessor.from_pretrained(processor or repo_or_path)
        return cls(model, clip_processor, mode=mode, name=name, batch_size=batch_size)

    def _score_batch(self, prompts: list[str], images: list[Image.Image]) -> torch.Tensor:
        inputs = self.processor(text=prompts, images=images, padding=True, truncation=True, return_tensors="pt")
        parameter = next(self.model.parameters())
        outputs = self.model(
            input_ids=inputs["input_ids"].to(parameter.device),
            attention_mask=inputs["attention_mask"].to(parameter.device),
            pixel_values=inputs["pixel_values"].to(parameter.device, parameter.dtype),
        )
        cosine = (outputs.image_embeds * outputs.text_embeds).sum(dim=-1)  # both embeddings are L2-normalised
        scale = 100.0 if self.mode == "clip" else self.model.logit_scale.exp()
        return scale * cosine


class ImageRewardScorer(Scorer):
    """ImageReward (BLIP + MLP, package `image-reward`), batched re-implementation of `ImageReward.score`."""

    def __init__(self, model: torch.nn.Module, *, name: str = "imagereward", batch_size: int = 16):
        super().__init__(name, _parameter_count(model), batch_size)
        self.model = model.eval()

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str = "ImageReward-v1.0",
        *,
        device: str | torch.device | None = None,
        download_root: str | None = None,
        **kwargs,
    ) -> ImageRewardScorer:
        """Loads a checkpoint through `ImageReward.load`."""
        image_reward = _import_optional("ImageReward", "image-reward", cls.__name__)
        model = image_reward.load(name_or_path, device=str(device or _default_device()), download_root=download_root)
        return cls(model, **kwargs)

    def _score_batch(self, prompts: list[str], images: list[Image.Image]) -> torch.Tensor:
        parameter = next(self.model.parameters())
        blip = self.model.blip
        text = blip.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        pixels = torch.stack([self.model.preprocess(image) for image in images])
        image_embeds = blip.visual_encoder(pixels.to(parameter.device, parameter.dtype))
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text_output = blip.text_encoder(
            text.input_ids.to(parameter.device),
            attention_mask=text.attention_mask.to(parameter.device),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            return_dict=True,
        )
        features = text_output.last_hidden_state[:, 0, :]
        rewards = self.model.mlp(features.to(next(self.model.mlp.parameters()).dtype)).squeeze(-1)
        return (rewards - self.model.mean) / self.model.std


class HPSv2Scorer(Scorer):
    """HPSv2 / HPSv2.1 (OpenCLIP ViT-H-14, package `hpsv2`): cosine of the normalised image and text features."""

    def __init__(self, model: torch.nn.Module, preprocess, tokenizer, *, name: str = "hpsv2", batch_size: int = 16):
        super().__init__(name, _parameter_count(model), batch_size)
        self.model, self.preprocess, self.tokenizer = model.eval(), preprocess, tokenizer

    @classmethod
    def from_pretrained(
        cls,
        version: str = "v2.1",
        *,
        checkpoint_path: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        **kwargs,
    ) -> HPSv2Scorer:
        """Builds ViT-H-14 and loads the HPS checkpoint `version` ("v2.0" or "v2.1") or `checkpoint_path`."""
        _import_optional("hpsv2", "hpsv2", cls.__name__)
        import huggingface_hub
        from hpsv2.src.open_clip import create_model_and_transforms, get_tokenizer
        from hpsv2.utils import hps_version_map

        if checkpoint_path is None:
            if version not in hps_version_map:
                raise ValueError(f"unknown HPS version {version!r}, expected one of {sorted(hps_version_map)}")
            checkpoint_path = huggingface_hub.hf_hub_download("xswu/HPSv2", hps_version_map[version])
        model, _, preprocess = create_model_and_transforms("ViT-H-14", None, precision="fp32", output_dict=True)
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        model.load_state_dict(checkpoint["state_dict"])
        model.to(device=device or _default_device(), dtype=dtype)
        kwargs.setdefault("name", f"hps{version}")
        return cls(model, preprocess, get_tokenizer("ViT-H-14"), **kwargs)

    def _score_batch(self, prompts: list[str], images: list[Image.Image]) -> torch.Tensor:
        parameter = next(self.model.parameters())
        pixels = torch.stack([self.preprocess(image) for image in images]).to(parameter.device, parameter.dtype)
        outputs = self.model(pixels, self.tokenizer(prompts).to(parameter.device))
        return (outputs["image_features"] * outputs["text_features"]).sum(dim=-1)


class HPSv3Scorer(Scorer):
    """HPSv3 (Qwen2-VL reward model, package `hpsv3`): the predicted mean of its (mu, sigma) output."""

    def __init__(self, inferencer, *, name: str = "hpsv3", batch_size: int = 8):
        super().__init__(name, _parameter_count(inferencer.model), batch_size)
        self.inferencer = inferencer

    @classmethod
    def from_pretrained(
        cls,
        checkpoint_path: str | None = None,
        *,
        config_path: str | None = None,
        device: str | torch.device | None = None,
        **kwargs,
    ) -> HPSv3Scorer:
        """Builds `hpsv3.HPSv3RewardInferencer` (default checkpoint from the Hub)."""
        hpsv3 = _import_optional("hpsv3", "hpsv3", cls.__name__)
        inferencer = hpsv3.HPSv3RewardInferencer(
            config_path=config_path, checkpoint_path=checkpoint_path, device=str(device or _default_device())
        )
        return cls(inferencer, **kwargs)

    def _score_batch(self, prompts: list[str], images: list[Image.Image]) -> torch.Tensor:
        return self.inferencer.reward(image_paths=images, prompts=prompts)[:, 0]
