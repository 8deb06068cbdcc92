"""`DiNaTrainer`: the HF `Trainer` with the noise-calibrated preference objective of DiNa-LRM (SPEC §1-2).

Per pair, one noise level is sampled and snapped to the model's grid, one noise draw is shared by the chosen and the
rejected latent, both run in one batched forward, and the loss of SPEC §2 (ties and soft labels included) is taken.
Everything else is the `Trainer`'s own: optimizers, schedulers, logging integrations, checkpoint rotation, resume.

Distributed training goes through the `Trainer`'s own arguments and launchers (`torchrun`, `accelerate launch`):

- DDP: `torchrun --nproc_per_node N train.py` (or `dina train` under `torchrun`); gloo on CPU, NCCL on GPUs.
  Every process draws the noise of the whole global batch from the identically seeded global RNG and keeps its own
  slice, so a run gives the same result however a global batch is split (tested with two CPU processes).
- DeepSpeed ZeRO-1/2: `DiNaTrainingArguments(deepspeed="ds_config.json")` (or the `deepspeed` key of the CLI's
  `training` section); the trainable weights stay whole on every process and are saved as with DDP. Not exercised
  by the tests (DeepSpeed is not a dependency).
- FSDP (`fsdp=...`) and ZeRO-3 shard the parameters themselves; saving and resuming read the LoRA + head straight
  from the model, which sharding breaks, so `DiNaTrainer` refuses them. The trainable part is a few megabytes; the
  frozen base is what takes memory, and it can be loaded in bf16 (`from_base(..., dtype=torch.bfloat16)`).
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch
from safetensors.torch import load_file
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, EvalPrediction

from ..losses import preference_loss
from ..metrics import pairwise_accuracy
from ..modeling_dina import WEIGHTS_NAME, DiNaRewardModel
from ..noise import sample_noise_levels
from .arguments import LOSS_ARGUMENTS, SAMPLING_ARGUMENTS, DiNaTrainingArguments
from .batching import BucketSampler, PreferenceCollator, single_size_batches
from .checkpoints import CheckpointCompletionCallback
from .ema import EMACallback
from .hub import make_model_card


class DiNaTrainer(Trainer):
    """Train a [`DiNaRewardModel`] on cached preference pairs (see `training.caching`).

    Batches come from [`PreferenceCollator`]; datasets with `bucket_ids` (a `CachedPreferenceDataset`) are batched
    one latent size at a time. Logged while training: `loss`, `accuracy`, `rewards/chosen`, `rewards/rejected`,
    `rewards/margin` and `accuracy/sigma_<lo>-<hi>` per noise-level bucket. `evaluate` reports the loss and the
    pairwise accuracy at each evaluation noise level (`eval_accuracy_u<level>`) and for their ensemble
    (`eval_accuracy_ensemble`). Checkpoints hold LoRA + head (never the frozen base), the EMA when on, optimizer,
    scheduler and RNG states; `save_model` writes the EMA weights when EMA is on.
    """

    loss_is_scaled_for_ga = False  # `compute_loss` returns a per-batch mean; the Trainer divides it for accumulation

    def __init__(
        self,
        model: DiNaRewardModel,
        args: DiNaTrainingArguments,
        train_dataset=None,
        eval_dataset=None,
        data_collator=None,
        callbacks=None,
        **kwargs,
    ):
        if not isinstance(model, DiNaRewardModel):
            raise TypeError(f"DiNaTrainer trains a DiNaRewardModel, got {type(model).__name__}.")
        if not isinstance(args, DiNaTrainingArguments):
            raise TypeError(f"DiNaTrainer needs DiNaTrainingArguments, got {type(args).__name__}.")
        self.knobs = args.resolve_with(model.config)  # loss and sampling settings actually trained with
        callbacks = list(callbacks or [])
        if args.ema_decay > 0:
            callbacks.append(EMACallback(args.ema_decay))
        callbacks.append(CheckpointCompletionCallback())  # last: its marker says every other save is done
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator or PreferenceCollator(),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            callbacks=callbacks,
            compute_metrics=kwargs.pop("compute_metrics", None) or self.accuracy_metrics,
            **kwargs,
        )
        if self.is_fsdp_enabled or getattr(self.accelerator.state.deepspeed_plugin, "zero_stage", None) == 3:
            raise NotImplementedError(
                "DiNaTrainer saves and resumes LoRA + head from the unwrapped model, which FSDP and ZeRO-3 shard; "
                "use DDP or DeepSpeed ZeRO-1/2."
            )
        self._train_stats: torch.Tensor | None = None
        self._eval_generator: torch.Generator | None = None

    # ------------------------------------------------------------------------------------------------ helpers

    @property
    def dina(self) -> DiNaRewardModel:
        """The unwrapped model."""
        return self.accelerator.unwrap_model(self.model)

    @property
    def ema(self) -> EMACallback | None:
        return next((cb for cb in self.callback_handler.callbacks if isinstance(cb, EMACallback)), None)

    @property
    def eval_noise_levels(self) -> list[float]:
        return self.args.eval_noise_levels or list(self.dina.config.ensemble_noise_levels)

    def _ema_weights(self):
        return self.ema.applied(self.dina) if self.ema is not None else nullcontext()

    def _score(self, model, inputs, latents: torch.Tensor, noise: torch.Tensor, **levels) -> tuple:
        """Rewards `(2, B)` (fp32) of a batch's chosen and rejected latents, stacked on the batch axis as
        `[chosen; rejected]` with one shared noise draw, through the (possibly wrapped) `model` in one batched forward;
        and the sigmas used. `levels` are `noise_level(s)` of `DiNaRewardModel.noised_inputs`."""
        pooled, mask = inputs.get("pooled_prompt_embeds"), inputs.get("prompt_embeds_mask")
        forward, sigmas = self.dina.noised_inputs(
            latents,
            inputs["prompt_embeds"].repeat(2, 1, 1),
            None if pooled is None else pooled.repeat(2, 1),
            None if mask is None else mask.repeat(2, 1),
            noise=torch.cat([noise, noise]),
            **levels,
        )
        return model(**forward).rewards.float().view(2, -1), sigmas

    def _loss(self, rewards: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        knobs = {name: self.knobs[name] for name in LOSS_ARGUMENTS}
        return preference_loss(
            knobs.pop("loss_type"), rewards[0], rewards[1], sigma, labels, eps=self.dina.config.loss_eps, **knobs
        )

    def _pairs(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        chosen, rejected = inputs["chosen_latents"], inputs["rejected_latents"]
        if chosen.shape != rejected.shape:
            raise ValueError(f"chosen latents {tuple(chosen.shape)} and rejected {tuple(rejected.shape)} differ")
        return chosen, rejected

    # ------------------------------------------------------------------------------------------------ training

    def _draw_training_noise(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise levels `(B,)` and noise `(B, C, H, W)` from the global RNGs (saved in checkpoints). The whole global
        batch is drawn on every process and each keeps its slice, so the split across processes does not matter."""
        n, world, rank = latents.shape[0], self.accelerator.num_processes, self.accelerator.process_index
        levels = sample_noise_levels(
            world * n, self.knobs["noise_sampling"], **{name: self.knobs[name] for name in SAMPLING_ARGUMENTS}
        )
        noise = torch.randn((world * n, *latents.shape[1:]), device=latents.device)
        return levels[rank * n : (rank + 1) * n], noise[rank * n : (rank + 1) * n]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The preference loss of a batch at one sampled noise level per pair, shared by its two images."""
        chosen, rejected = self._pairs(inputs)
        levels, noise = self._draw_training_noise(chosen)
        rewards, sigmas = self._score(model, inputs, torch.cat([chosen, rejected]), noise, noise_level=levels.repeat(2))
        sigma = sigmas[: len(levels)]
        loss = self._loss(rewards, sigma, inputs["labels"])
        if model.training:
            self._accumulate_train_stats(rewards.detach(), sigma, inputs["labels"])
        if return_outputs:
            return loss, {"rewards_chosen": rewards[0], "rewards_rejected": rewards[1], "sigma": sigma}
        return loss

    def _accumulate_train_stats(self, rewards: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> None:
        """Sums behind the logged metrics: pairs, reward sums, decisive pairs, credit, and per-bucket credit/count."""
        margin = rewards[0] - rewards[1]
        decisive = labels != 0.5
        agree = margin * torch.sign(labels - 0.5)
        credit = torch.where(agree > 0, 1.0, torch.where(margin == 0, 0.5, 0.0)) * decisive
        buckets = self.args.num_noise_buckets
        index = (sigma * buckets).long().clamp(0, buckets - 1)
        per_bucket = torch.zeros(2, buckets, dtype=torch.float64, device=rewards.device)
        per_bucket[0].index_add_(0, index, credit.double())
        per_bucket[1].index_add_(0, index, decisive.double())
        head = torch.stack(
            [margin.new_tensor(len(margin)), rewards[0].sum(), rewards[1].sum(), decisive.float().sum(), credit.sum()]
        ).double()
        stats = torch.cat([head, per_bucket.flatten()])
        self._train_stats = stats if self._train_stats is None else self._train_stats + stats

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the training metrics accumulated since the last log (summed over processes) to a training log."""
        if "loss" in logs and self._train_stats is not None:
            stats = self.accelerator.reduce(self._train_stats, reduction="sum").tolist()
            self._train_stats = None
            n, chosen, rejected, decisive, credit = stats[:5]
            logs.update({"rewards/chosen": chosen / n, "rewards/rejected": rejected / n})
            logs["rewards/margin"] = (chosen - rejected) / n
            if decisive:
                logs["accuracy"] = credit / decisive
            buckets = self.args.num_noise_buckets
            for b, (bucket_credit, count) in enumerate(zip(stats[5 : 5 + buckets], stats[5 + buckets :])):
                if count:
                    logs[f"accuracy/sigma_{b / buckets:.2f}-{(b + 1) / buckets:.2f}"] = bucket_credit / count
        super().log(logs, start_time)

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        bucket_ids = getattr(dataset, "bucket_ids", None)
        if bucket_ids is None:
            return super()._get_train_sampler(train_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return BucketSampler(bucket_ids, self._train_batch_size * self.args.world_size, seed=seed)

    # ------------------------------------------------------------------------------------------------ evaluation

    def get_eval_dataloader(self, eval_dataset=None):
        """Single-size batches for datasets with `bucket_ids` (each pair once, in dataset order within a size)."""
        dataset = self.eval_dataset[eval_dataset] if isinstance(eval_dataset, str) else eval_dataset
        dataset = dataset if dataset is not None else self.eval_dataset
        if getattr(dataset, "bucket_ids", None) is None:
            return super().get_eval_dataloader(eval_dataset)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=single_size_batches(dataset.bucket_ids, self.args.eval_batch_size),
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        return self.accelerator.prepare(loader)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """The `Trainer`'s evaluation with the EMA weights when EMA is on, and the evaluation noise drawn from a
        generator seeded with `args.seed`, so every evaluation sees the same draws."""
        self._eval_generator = None
        with self._ema_weights():
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Rewards of a batch at each evaluation noise level and for their ensemble (one noise draw per pair, shared
        by levels and by the pair's images). Returns `(loss, rewards (B, K + 1, 2), labels)`; the loss is the mean
        over levels."""
        inputs = self._prepare_inputs(inputs)
        chosen, rejected = self._pairs(inputs)
        if self._eval_generator is None:
            self._eval_generator = torch.Generator(chosen.device).manual_seed(self.args.seed)
        noise = torch.randn(chosen.shape, generator=self._eval_generator, device=chosen.device)
        latents, levels, labels = torch.cat([chosen, rejected]), self.eval_noise_levels, inputs["labels"]
        with torch.no_grad():
            scored = [self._score(model, inputs, latents, noise, noise_level=u) for u in levels]
            rewards = [r for r, _ in scored] + [self._score(model, inputs, latents, noise, noise_levels=levels)[0]]
            sigmas = [s.expand(len(labels)) for _, s in scored]
            loss = torch.stack([self._loss(r, s, labels) for r, s in zip(rewards, sigmas)]).mean()
        logits = torch.stack(rewards).permute(2, 0, 1)
        return loss, None if prediction_loss_only else logits, labels

    def accuracy_metrics(self, prediction: EvalPrediction) -> dict[str, float]:
        """`compute_metrics`: pairwise accuracy (tie-labelled pairs excluded) at each evaluation noise level
        (`accuracy_u<level>`) and for their ensemble (`accuracy_ensemble`)."""
        rewards = torch.as_tensor(prediction.predictions)
        labels = torch.as_tensor(prediction.label_ids)
        names = [f"u{u:g}" for u in self.eval_noise_levels] + ["ensemble"]
        return {
            f"accuracy_{name}": pairwise_accuracy(rewards[:, k, 0], rewards[:, k, 1], labels)["accuracy"]
            for k, name in enumerate(names)
        }

    # ------------------------------------------------------------------------------------------------ saving

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write LoRA + head + config with the model's own `save_pretrained` (the frozen base is named, not copied).
        Checkpoints (`checkpoint-*` folders) hold the training weights and the EMA state; other saves hold the EMA
        weights when EMA is on."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            if os.path.basename(os.path.normpath(output_dir)).startswith(PREFIX_CHECKPOINT_DIR):
                self.dina.save_pretrained(output_dir)
                if self.ema is not None:
                    self.ema.save(output_dir)
            else:
                with self._ema_weights():
                    self.dina.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Load LoRA + head (and the EMA state when EMA is on) from a checkpoint written by `_save_checkpoint`."""
        model = self.dina if model is None else self.accelerator.unwrap_model(model)
        path = os.path.join(resume_from_checkpoint, WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{resume_from_checkpoint!r} has no {WEIGHTS_NAME}: not a DiNaTrainer checkpoint.")
        model.load_trainable_state_dict(load_file(path), source=path)
        if self.ema is not None:
            self.ema.load(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        """`load_best_model_at_end`: the best checkpoint's LoRA + head (and EMA state) through our loader."""
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset: str | list[str] | None = None,
        eval_dataset: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        language: str | None = None,
    ) -> None:
        """Write `README.md` in `output_dir` with `training.hub.make_model_card`: the training `dataset`(s) and the last
        evaluation's accuracies (attributed to `eval_dataset`). `Trainer.push_to_hub(**kwargs)` passes its keyword
        arguments here and uploads the card with the weights."""
        if not self.is_world_process_zero():
            return
        evaluations = [entry for entry in self.state.log_history if any(k.startswith("eval_") for k in entry)]
        last = evaluations[-1] if evaluations else {}
        card = make_model_card(
            self.dina.config,
            repo_id=self.hub_model_id or model_name,
            datasets=[dataset] if isinstance(dataset, str) else dataset,
            metrics={k: v for k, v in last.items() if k.startswith("eval_accuracy") and v == v},  # NaN: all ties
            eval_dataset=eval_dataset,
            training_steps=self.state.global_step,
            training=self.knobs,
            license=license,
            tags=[tags] if isinstance(tags, str) else tags,
            language=language,
        )
        card.save(os.path.join(self.args.output_dir, "README.md"))


__all__ = ["DiNaTrainer"]
