"""On-policy reward refresh: keep a learned latent reward honest while a generator is aligned against it.

A policy optimised against a fixed learned reward drifts to samples the reward has never seen and overrates (reward
hacking). Every few steps `RewardRefresh` samples the current policy, has a labeler judge the samples (a checker, a
VLM judge, people), pairs them within each prompt and fine-tunes the DiNa reward's LoRA and head on those pairs with
the noise-calibrated Thurstone loss of its own training (SPEC §2), so the reward learns what the policy now produces.
With `scored`, it labels the samples the alignment method itself scored since the last refresh (GRPO's groups: many
more on-policy pairs per refresh, and no extra sampling) instead of sampling the policy.

Pairs within a prompt teach the reward only where the labeler sees a difference. A reward-gradient method (ReFL)
climbs the reward along directions the labeler does not see at all (in the Shapes world a few steps of gradient
ascent on a sample's latent raise DiNa-LRM's reward by several units and leave the checker's verdict unchanged), and
such pairs never say that this is wrong. With `adversarial_steps`, each labelled sample is also pushed up the current
reward's gradient and labelled again; the pair (sample, pushed sample) is a tie when the labeler sees no difference
(soft label 0.5: the reward learns to stay flat along its own adversarial directions), else the better one wins.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..losses import thurstone_loss
from ..modeling_dina import ADAPTER_NAME, DiNaRewardModel
from ..noise import sample_noise_levels
from .reward_fns import DiNaLatentReward, decode_latents
from .sampling import encode_prompts


class RewardRefresh:
    """`fn(pipe, step) -> {metric: value}` for `align(..., step_callback=...)`: every `every` steps, refresh `model`.

    Args:
        model: the DiNa reward being optimised against (its backbone may be the generator's own blocks).
        labeler: `fn(images, prompts) -> one number per image` (PIL images); higher is better, equal is a tie.
        prompts: the prompts to sample (the alignment's training prompts).
        every: refresh after every `every` alignment steps.
        num_prompts, per_prompt: how many prompts are drawn per refresh and how many samples each gets.
        train_steps, batch_size, learning_rate: the reward's AdamW updates per refresh (pairs drawn from the buffer).
        buffer_size: how many of the most recent pairs are kept and trained on.
        sample_kwargs: the policy's sampler settings (`num_inference_steps`, `guidance_scale`,
            `max_sequence_length`), as inference uses them.
        seed: seed of the prompt draws, the sampler, the pairs and the noise.
        scored: the reward the policy is aligned against (wrapping `model`): when given, a refresh labels the
            samples it scored (with prompts) since the last refresh instead of sampling `num_prompts` x `per_prompt`
            (it samples only when there are none, e.g. ReFL's differentiable calls pass no prompts).
        noise_levels: the levels a refresh trains at, one drawn per pair: None = uniform on [0, 1] (the reward's own
            training); the level(s) the alignment scores at spend every update on the comparisons it reads.
        adversarial_steps, adversarial_step_size: 0, or how many normalised gradient-ascent steps on the current
            reward make each labelled sample's adversarial partner, and their size (per-element root mean square
            of the step, in latent units).
    """

    def __init__(
        self,
        model: DiNaRewardModel,
        labeler: Callable[[list, list[str]], Sequence[float]],
        prompts: Sequence[str],
        *,
        every: int = 10,
        num_prompts: int = 16,
        per_prompt: int = 4,
        train_steps: int = 20,
        batch_size: int = 32,
        learning_rate: float = 1e-4,
        buffer_size: int = 2048,
        sample_kwargs: dict | None = None,
        seed: int = 0,
        scored: DiNaLatentReward | None = None,
        noise_levels: Sequence[float] | None = None,
        adversarial_steps: int = 0,
        adversarial_step_size: float = 0.02,
    ):
        if every < 1 or per_prompt < 2 or num_prompts < 1 or train_steps < 0 or batch_size < 1 or buffer_size < 1:
            raise ValueError(
                "every, num_prompts, batch_size and buffer_size must be >= 1, per_prompt >= 2 and train_steps >= 0."
            )
        self.model, self.labeler, self.prompts = model, labeler, list(prompts)
        self.every, self.num_prompts, self.per_prompt = every, num_prompts, per_prompt
        self.train_steps, self.batch_size, self.buffer_size = train_steps, batch_size, buffer_size
        self.sample_kwargs = dict(sample_kwargs or {})
        if noise_levels is not None and (not noise_levels or any(not 0 <= u <= 1 for u in noise_levels)):
            raise ValueError(f"`noise_levels` must be a non-empty list of levels in [0, 1], got {noise_levels}.")
        if adversarial_steps < 0 or adversarial_step_size <= 0:
            raise ValueError("`adversarial_steps` must be >= 0 and `adversarial_step_size` > 0.")
        self.adversarial_steps, self.adversarial_step_size = adversarial_steps, adversarial_step_size
        self.noise_levels = None if noise_levels is None else torch.tensor(noise_levels, dtype=torch.float32)
        self.params = [
            p for n, p in model.named_parameters() if f".{ADAPTER_NAME}." in n or n.startswith("reward_head.")
        ]
        self.optimizer = torch.optim.AdamW(self.params, lr=learning_rate, weight_decay=0.0)
        self.generator = torch.Generator().manual_seed(seed)
        self.buffer: dict[str, torch.Tensor] = {}
        self.scored = scored
        if scored is not None:
            if scored.model is not model:
                raise ValueError("`scored` must be the reward built on `model`, the model the refresh trains.")
            scored.scored = []

    def __call__(self, pipe, step: int) -> dict[str, float]:
        if step % self.every:
            return {}
        from_scored = self.scored is not None and bool(self.scored.scored)
        if from_scored:
            latents = torch.cat([x for x, _ in self.scored.scored])
            prompts = [p for _, batch in self.scored.scored for p in batch]
            self.scored.scored.clear()
        else:
            latents, prompts = self.sample(pipe)
        pairs, metrics = self.label_pairs(pipe, latents, prompts)
        if self.buffer:
            pairs = {k: torch.cat([self.buffer[k], v]) for k, v in pairs.items()}
        self.buffer = {k: v[-self.buffer_size :] for k, v in pairs.items()}
        return {
            "refresh/labelled": float(len(prompts)),
            "refresh/from_scored": float(from_scored),
            "refresh/fixed_levels": float(self.noise_levels is not None),
            "refresh/pairs": float(len(self.buffer["chosen"])),
            **metrics,
            "refresh/loss": self.train() if self.train_steps else float("nan"),
        }

    @torch.no_grad()
    def sample(self, pipe) -> tuple[torch.Tensor, list[str]]:
        """`per_prompt` samples of the current policy for each of `num_prompts` drawn prompts: (latents, prompts)."""
        picks = torch.randint(len(self.prompts), (self.num_prompts,), generator=self.generator).tolist()
        prompts = [self.prompts[i] for i in picks for _ in range(self.per_prompt)]
        seeds = torch.randint(2**31 - 1, (len(prompts),), generator=self.generator).tolist()
        generators = [torch.Generator(pipe.device).manual_seed(s) for s in seeds]
        latents = pipe(prompt=prompts, generator=generators, output_type="latent", **self.sample_kwargs).images
        return latents, prompts

    @torch.no_grad()
    def label_pairs(self, pipe, latents: torch.Tensor, prompts: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
        """Label the samples and pair every two of one prompt whose labels differ (the higher one chosen, label 1);
        with `adversarial_steps`, also each sample against its adversarial partner (`adversarial_pairs`). Returns
        the pairs (`chosen`, `rejected`, their prompt encodings and soft `labels`) and metrics to log."""
        labels = torch.as_tensor(self.labeler(decode_latents(pipe, latents), prompts), dtype=torch.float32)
        cond = encode_prompts(pipe, prompts, guidance_scale=1.0, **self._encode_kwargs())
        by_prompt: dict[str, list[int]] = {}
        for i, prompt in enumerate(prompts):
            by_prompt.setdefault(prompt, []).append(i)
        chosen, rejected = [], []
        for group in by_prompt.values():
            for i in group:
                for j in group:
                    if labels[i] > labels[j]:
                        chosen.append(i)
                        rejected.append(j)
        chosen, rejected = torch.tensor(chosen, dtype=torch.long), torch.tensor(rejected, dtype=torch.long)
        pairs = {
            "chosen": latents[chosen].cpu(),
            "rejected": latents[rejected].cpu(),
            "prompt_embeds": cond.prompt_embeds[chosen].cpu(),
            "pooled_prompt_embeds": cond.pooled_prompt_embeds[chosen].cpu(),
            "labels": torch.ones(len(chosen)),
        }
        if not self.adversarial_steps:
            return pairs, {}
        pushed = self.ascend(latents, cond)
        pushed_labels = torch.as_tensor(self.labeler(decode_latents(pipe, pushed), prompts), dtype=torch.float32)
        adversarial = {
            "chosen": latents.cpu(),
            "rejected": pushed.cpu(),
            "prompt_embeds": cond.prompt_embeds.cpu(),
            "pooled_prompt_embeds": cond.pooled_prompt_embeds.cpu(),
            "labels": 0.5 + 0.5 * torch.sign(labels - pushed_labels),  # 1: the push made it worse, 0.5: unseen
        }
        metrics = {"refresh/adversarial_ties": (adversarial["labels"] == 0.5).float().mean().item()}
        return {k: torch.cat([pairs[k], adversarial[k]]) for k in pairs}, metrics

    def ascend(self, latents: torch.Tensor, cond) -> torch.Tensor:
        """`adversarial_steps` steps up the current reward's gradient from `latents`, each normalised to a
        per-element root mean square of `adversarial_step_size` (a fresh noise level and draw per step)."""
        pushed = latents.detach().float()
        for _ in range(self.adversarial_steps):
            pushed.requires_grad_(True)
            with torch.enable_grad():
                rewards = self.model.score_clean(
                    pushed.to(latents.dtype),
                    cond.prompt_embeds,
                    cond.pooled_prompt_embeds,
                    noise_level=self.draw_levels(len(pushed)).to(latents.device),
                    noise=torch.randn(pushed.shape, generator=self.generator).to(latents.device),
                ).rewards
                (grad,) = torch.autograd.grad(rewards.sum(), pushed)
            rms = grad.flatten(1).pow(2).mean(dim=1).sqrt().clamp_min(1e-12).view(-1, *[1] * (grad.ndim - 1))
            pushed = (pushed + self.adversarial_step_size * grad / rms).detach()
        return pushed.to(latents.dtype)

    def _encode_kwargs(self) -> dict:
        length = self.sample_kwargs.get("max_sequence_length", self.model.config.max_sequence_length)
        return {"max_sequence_length": length}

    def train(self) -> float:
        """`train_steps` updates of the reward on pairs from the buffer: one noise level (uniform, or one of
        `noise_levels`) and one draw per pair, shared by its two latents (common random numbers, SPEC §1); returns
        the mean loss."""
        count = len(self.buffer.get("chosen", ()))
        if not count:
            return float("nan")
        device = next(iter(self.params)).device
        for p in self.params:
            p.requires_grad_(True)
        losses = []
        try:  # the model stays in eval mode: its backbone may be the generator's own blocks
            for _ in range(self.train_steps):
                index = torch.randint(count, (min(self.batch_size, count),), generator=self.generator)
                batch = {k: v[index].to(device) for k, v in self.buffer.items()}
                levels = self.draw_levels(len(index))
                noise = torch.randn(batch["chosen"].shape, generator=self.generator).to(device)
                out = self.model.score_clean(
                    torch.cat([batch["chosen"], batch["rejected"]]),
                    batch["prompt_embeds"].repeat(2, 1, 1),
                    batch["pooled_prompt_embeds"].repeat(2, 1),
                    noise_level=levels.repeat(2).to(device),
                    noise=noise.repeat(2, 1, 1, 1),
                )
                rewards, sigma = out.rewards.view(2, -1), out.sigmas[: len(index)]
                loss = thurstone_loss(rewards[0], rewards[1], sigma.to(rewards.device), labels=batch.get("labels"))
                loss.backward()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
        finally:
            for p in self.params:
                p.requires_grad_(False)
        return sum(losses) / len(losses)

    def draw_levels(self, n: int) -> torch.Tensor:
        if self.noise_levels is None:
            return sample_noise_levels(n, generator=self.generator)
        return self.noise_levels[torch.randint(len(self.noise_levels), (n,), generator=self.generator)]

    def state_dict(self) -> dict:
        return {
            "reward": {k: v.detach().cpu() for k, v in self.model.trainable_state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "buffer": self.buffer,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_trainable_state_dict(state["reward"], source="the refresh checkpoint")
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.buffer = state["buffer"]
