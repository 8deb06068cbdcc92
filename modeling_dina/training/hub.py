"""Sharing a trained DiNa-LRM on the Hub: a generated model card, the folder to upload, and the upload itself.

What is uploaded is LoRA + head + config (+ the modelling code for `trust_remote_code`) and `README.md`; the frozen
base is named in the config and fetched from its own repo when the model is loaded.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import filter_repo_objects
from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS

from ..configuration_dina import DiNaConfig
from ..modeling_loading import TMP_SAVE_PREFIX

TRAINER_IGNORE_PATTERNS = ("_*", "checkpoint-*")
"""What `Trainer.push_to_hub` leaves out of its output folder."""
UPLOAD_IGNORE_PATTERNS = (f"{TMP_SAVE_PREFIX}*", f"*/{TMP_SAVE_PREFIX}*")
"""Never uploaded: the temporary folders of `DiNaRewardModel.save_pretrained`."""

# The Hub task for scoring an image against a text, under which CLIP-style preference scorers (PickScore, HPS) are
# listed; the Hub has no reward-model task for images.
PIPELINE_TAG = "zero-shot-image-classification"
TAGS = ("dina-lrm", "reward-model", "preference-learning", "diffusion", "text-to-image")

_TEMPLATE = """\
---
{card_data}
---

# {title}

A DiNa-LRM reward model (diffusion-native latent reward model, arXiv 2602.11146): the first \
{num_layers} blocks of `{base}`'s diffusion transformer (frozen, with a rank-{lora_rank} LoRA) read a noisy latent \
and a reward head scores how well it matches the prompt and human taste. This repo holds only the LoRA, the head and \
the config; the base weights are read from `{base}`.

## Usage

```python
from transformers import AutoModel

model = AutoModel.from_pretrained("{repo_id}", trust_remote_code=True)
```

With the `modeling_dina` package installed, `DiNaRewardModel.from_pretrained("{repo_id}")` loads the same model.

## Training

- Base model: `{base}`
- Training data: {datasets}
- Loss: `{loss_type}` ({loss_form}), noise levels sampled `{noise_sampling}`
- Tapped layers: visual {visual_layers}, text {text_layers}{steps}

## Evaluation{eval_dataset}

{metrics}
"""


def make_model_card(
    config: DiNaConfig,
    *,
    repo_id: str | None = None,
    datasets: Sequence[str] | None = None,
    metrics: dict[str, float] | None = None,
    eval_dataset: str | None = None,
    training_steps: int | None = None,
    training: dict | None = None,
    license: str | None = None,
    tags: Sequence[str] | None = None,
    language: str | None = None,
) -> ModelCard:
    """A model card with Hub metadata (base model, training `datasets`, tags, and `metrics` as evaluation results on
    `eval_dataset` when it is named) and a body saying how to load the model."""
    repo_id = repo_id or "<user>/<repo>"
    training = {**config.legacy_training_values, **(training or {})}
    datasets = list(datasets or [])
    metrics = dict(metrics or {})
    eval_results = [
        EvalResult(
            task_type="text-to-image",
            task_name="pairwise preference accuracy",
            dataset_type=eval_dataset,
            dataset_name=eval_dataset,
            metric_type="accuracy",
            metric_name=name,
            metric_value=float(value),
        )
        for name, value in metrics.items()
        if eval_dataset
    ]
    card_data = ModelCardData(
        base_model=config.base_model_name_or_path,
        # LoRA + head on the base's blocks (the base is fetched from its repo); a merged folder carries its weights.
        base_model_relation="finetune" if config.base_weights_included else "adapter",
        datasets=datasets or None,
        library_name="transformers",  # `AutoModel.from_pretrained(..., trust_remote_code=True)` loads it
        pipeline_tag=PIPELINE_TAG,
        license=license,
        language=language,
        tags=[*TAGS, *(tags or [])],
        metrics=["accuracy"] if metrics else None,
        model_name=repo_id.split("/")[-1],
        eval_results=eval_results or None,
    )
    table = "\n".join(f"| `{name}` | {value:.4f} |" for name, value in metrics.items())
    body = _TEMPLATE.format(
        card_data=card_data.to_yaml(),
        title=repo_id.split("/")[-1],
        repo_id=repo_id,
        base=config.base_model_name_or_path,
        num_layers=config.num_backbone_layers,
        lora_rank=config.lora_rank,
        datasets=", ".join(f"`{d}`" for d in datasets) or "not recorded",
        loss_type=training.get("loss_type", "not recorded"),
        loss_form=training.get("loss_form", "not recorded"),
        noise_sampling=training.get("noise_sampling", "not recorded"),
        visual_layers=list(config.visual_layers),
        text_layers=list(config.text_layers),
        steps=f"\n- Optimizer steps: {training_steps}" if training_steps is not None else "",
        eval_dataset=f" on `{eval_dataset}`" if eval_dataset else "",
        metrics=f"| metric | value |\n|---|---|\n{table}" if metrics else "No evaluation recorded.",
    )
    return ModelCard(body)


def prepare_upload_folder(model, folder: str | os.PathLike, **card_kwargs) -> str:
    """Write what a push uploads into `folder`: `model.save_pretrained` (LoRA + head + config) and `README.md` from
    `make_model_card(model.config, **card_kwargs)`."""
    folder = os.fspath(folder)
    model.save_pretrained(folder)
    make_model_card(model.config, **card_kwargs).save(os.path.join(folder, "README.md"))
    return folder


def files_to_upload(folder: str | os.PathLike, ignore_patterns: Sequence[str] = ()) -> list[str]:
    """The files (relative POSIX paths) `HfApi.upload_folder(folder, ignore_patterns=...)` would upload; temporary
    folders of a save (`.tmp-save-*`, left by a killed one) are always left out."""
    root = Path(folder)
    paths = sorted(p.relative_to(root).as_posix() for p in root.glob("**/*") if p.is_file())
    ignore = [*ignore_patterns, *DEFAULT_IGNORE_PATTERNS, *UPLOAD_IGNORE_PATTERNS]
    return list(filter_repo_objects(paths, ignore_patterns=ignore))


def push_model_to_hub(
    model,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload DiNa-LRM",
    **card_kwargs,
):
    """Create `repo_id` if needed and upload `prepare_upload_folder`'s files to it. Returns the commit info."""
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as folder:
        prepare_upload_folder(model, folder, repo_id=repo_id, **card_kwargs)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, commit_message=commit_message)


__all__ = [
    "TRAINER_IGNORE_PATTERNS",
    "UPLOAD_IGNORE_PATTERNS",
    "files_to_upload",
    "make_model_card",
    "prepare_upload_folder",
    "push_model_to_hub",
]
