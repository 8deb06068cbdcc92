"""Aligning an SD3-architecture generator with a latent reward (DiNa-LRM or any callable), in latent space:
reward-gradient fine-tuning (ReFL / DRaFT-K, `refl.py`), policy-gradient fine-tuning (Flow-GRPO, `grpo.py`) and
reward-ranked fine-tuning (RAFT, `raft.py`) of a LoRA on the generator, which shares its frozen blocks with the DiNa
reward."""

from .config import AlignmentConfig
from .grpo import group_advantages, grpo_step
from .loop import align, latest_checkpoint, load_checkpoint, run_alignment, save_checkpoint, write_curves
from .raft import raft_step
from .refl import refl_step
from .reward_fns import DiNaLatentReward, call_reward, decode_latents, make_pixel_reward_fn
from .sampling import (
    GENERATOR_ADAPTER,
    PromptEmbeddings,
    add_generator_lora,
    encode_prompts,
    euler_step,
    generator_lora_disabled,
    generator_lora_parameters,
    generator_lora_state_dict,
    guided_velocity,
    inference_schedule,
    initial_latents,
    load_generator_lora,
    save_generator_lora,
    sde_step,
)

__all__ = [
    "GENERATOR_ADAPTER",
    "AlignmentConfig",
    "DiNaLatentReward",
    "PromptEmbeddings",
    "add_generator_lora",
    "align",
    "call_reward",
    "decode_latents",
    "encode_prompts",
    "euler_step",
    "generator_lora_disabled",
    "generator_lora_parameters",
    "generator_lora_state_dict",
    "group_advantages",
    "grpo_step",
    "guided_velocity",
    "inference_schedule",
    "initial_latents",
    "latest_checkpoint",
    "load_checkpoint",
    "load_generator_lora",
    "make_pixel_reward_fn",
    "raft_step",
    "refl_step",
    "run_alignment",
    "save_checkpoint",
    "save_generator_lora",
    "sde_step",
    "write_curves",
]
