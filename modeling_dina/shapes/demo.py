"""The main job: generate N candidates per prompt with the Shapes generator, rank them with DiNa-LRM in latent space
(no decode needed to rank), decode only for display, and write a contact sheet with the checker's verdicts; print
best-of-N compliance against a random pick."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from ..pipeline_dina import DiNaRewardPipeline
from .checker import check_many
from .generator import load_generator
from .report import best_of_n, decode, generate_candidates, held_out_prompts
from .reward import REWARD_DIR

__all__ = ["ALIGNED_DIR", "aligned_lora", "contact_sheet", "run_demo"]

TILE = 128
ALIGNED_DIR = Path(__file__).parent / "assets" / "aligned"


def aligned_lora(path: str | Path | None = None) -> Path:
    """The folder of an aligned generator LoRA (diffusers format): `path`, or the one run shipped under
    `assets/aligned/`."""
    if path is not None:
        folder = Path(path)
    else:
        runs = sorted(d for d in ALIGNED_DIR.glob("*") if d.is_dir()) if ALIGNED_DIR.is_dir() else []
        if len(runs) != 1:
            raise FileNotFoundError(f"expected one aligned LoRA under {ALIGNED_DIR}, found {[d.name for d in runs]}")
        folder = runs[0]
    if not (folder / "pytorch_lora_weights.safetensors").is_file():
        raise FileNotFoundError(f"{folder} holds no pytorch_lora_weights.safetensors (a diffusers LoRA folder)")
    return folder


def contact_sheet(prompts: Sequence[str], images: Sequence[Image.Image], rewards: torch.Tensor, verdicts, n: int):
    """One row per prompt, its candidates left to right by decreasing reward; each tile shows the reward and the
    checker's verdict (green: complies, red: violates, with the violated attributes)."""
    font = ImageFont.load_default()
    label_w, caption_h = 260, 44
    sheet = Image.new("RGB", (label_w + n * TILE, len(prompts) * (TILE + caption_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, prompt in enumerate(prompts):
        y = row * (TILE + caption_h)
        draw.text((8, y + TILE // 2), prompt, fill="black", font=font)
        order = rewards[row * n : (row + 1) * n].argsort(descending=True).tolist()
        for col, k in enumerate(order):
            i, x = row * n + k, label_w + col * TILE
            sheet.paste(images[i].resize((TILE, TILE), Image.NEAREST), (x, y))
            verdict = verdicts[i]
            colour = (20, 140, 40) if verdict.overall else (200, 30, 30)
            draw.rectangle([x, y, x + TILE - 1, y + TILE - 1], outline=colour, width=3 if col == 0 else 1)
            # The violated attributes two per line (up to four): the caption stays inside its tile.
            violated = verdict.violations
            lines = [" ".join(violated[j : j + 2]) for j in range(0, len(violated), 2)]
            caption = "\n".join([f"r={rewards[i]:.2f} " + ("ok" if verdict.overall else "violates:"), *lines])
            draw.text((x + 4, y + TILE + 2), caption, fill=colour, font=font, spacing=1)
    return sheet


def _best_of_n_sheet(generator, reward, prompts, num_prompts, num_candidates, seed, sheet_path):
    """Candidates of `generator`, ranked by `reward` in latent space, judged by the checker; writes the sheet."""
    repeated, latents = generate_candidates(generator, prompts, num_candidates, seed=seed)
    rewards = reward(prompt=repeated, latents=latents).rewards  # ranked in latent space
    images = decode(generator, latents)  # for the checker and the sheet only
    verdicts = check_many(repeated, images)
    shown = num_prompts * num_candidates
    sheet = contact_sheet(prompts[:num_prompts], images[:shown], rewards[:shown], verdicts[:shown], num_candidates)
    sheet.save(sheet_path)
    return best_of_n(prompts, num_candidates, verdicts, {"dina": rewards})


def run_demo(
    output_dir: str | Path = "outputs/demo",
    *,
    num_prompts: int = 6,
    num_candidates: int = 4,
    eval_prompts: int = 64,
    seed: int = 0,
    aligned: str | Path | None = None,
    compare_aligned: bool = False,
) -> dict:
    """Run the demo; returns best-of-N compliance (random pick, DiNa pick, checker oracle) on `eval_prompts`. With
    `compare_aligned` the aligned generator (the LoRA at `aligned`, default the shipped one) runs on the same prompts
    and seeds too: a second sheet, and both compliances (`{"base": ..., "aligned": ...}`)."""
    torch.set_flush_denormal(True)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    generator = load_generator()
    # The reward reads the generator's own first blocks: one copy of the base, its LoRA on only while scoring.
    reward = DiNaRewardPipeline.from_pipe(generator, reward_model=str(REWARD_DIR))
    reward.set_progress_bar_config(disable=True)
    prompts = held_out_prompts(max(num_prompts, eval_prompts))
    args = (prompts, num_prompts, num_candidates, seed)
    result = _best_of_n_sheet(generator, reward, *args, out / "contact_sheet.png")
    _print(f"contact sheet: {out / 'contact_sheet.png'}", result, len(prompts), num_candidates)
    if compare_aligned:
        folder = aligned_lora(aligned)
        tuned = load_generator()
        tuned.load_lora_weights(folder)
        # scored by the reward on the base generator's blocks: the aligned LoRA never leaks into the reward
        aligned_result = _best_of_n_sheet(tuned, reward, *args, out / "contact_sheet_aligned.png")
        _print(
            f"aligned generator ({folder.name}): {out / 'contact_sheet_aligned.png'}",
            aligned_result,
            len(prompts),
            num_candidates,
        )
        result = {"base": result, "aligned": aligned_result, "aligned_lora": str(folder)}
    (out / "demo.json").write_text(json.dumps(result, indent=2))
    return result


def _print(title: str, result: dict, prompts: int, n: int) -> None:
    print(title)
    print(f"best-of-{n} compliance over {prompts} held-out prompts (checker):")
    print(f"  random pick   {100 * result['random']:5.1f} %  (one sample: the generator's own compliance)")
    print(f"  DiNa-LRM pick {100 * result['dina']:5.1f} %")
    print(f"  oracle        {100 * result['oracle']:5.1f} %")
