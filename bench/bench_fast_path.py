"""DiNa's scoring path against the authors' implementation, in the same process, on the same random weights: an
SD3.5-M-shaped DiNa model (`--layers` MMDiT blocks of SD3.5-M, dual attention in blocks 0..12, LoRA r64/alpha 128 on
the released targets, the released head), clean latents of 256² and 512² images, one noise level (0.4) and the K = 3
ensemble ([0.2, 0.5, 0.7]), fp32 and bf16. The default is the full measurement (12 layers, both sizes, both dtypes);
develop with `--layers 2` (taps [0, 1, 2]: the head keeps its released size), per-block costs extrapolate.

    nice python bench/bench_fast_path.py                       # the full measurement
    OMP_NUM_THREADS=1 nice python bench/bench_fast_path.py --layers 2 --threads 1

The authors' path is re-implemented here, following HKUST-C4G/diffusion-rm (`diffusion_rm/infer/inference.py`:
`DRMInferencer.reward`; `diffusion_rm/models/sd3_rm.py`: `SD3Backbone.forward`, `SD3RewardModel.forward` and
`forward_ensemble`; `diffusion_rm/models/reward_head.py`: `RewardHead.forward`/`forward_ensemble`,
`CrossAttnBlockVGated`): the peft LoRA unfused, the noise level snapped by `argmin` over the scheduler's sigmas, noised
in the latents' dtype and cast to the model's, one backbone call per noise level, each level's adapter tokens
concatenated, the head in the model's dtype with its `.contiguous()` head reshapes. It runs on our model's modules
(the same parameter names), before `fuse_reward_lora` folds the LoRA in for our path. Both paths get the same noise,
so the table also shows how far their rewards differ (fp round-off, and our fp32 read-out in bf16).

Our path is `DiNaRewardModel.score_clean` with the LoRA fused (`fuse_reward_lora`), eager and (unless `--no-compile`)
after `compile_regions` (each block and the head through `torch.compile`; compile time is not timed). The three paths
run in interleaved rounds, one call per case each (round 0 warms up and compiles); the best round counts (other
processes on a shared machine only ever add time).
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from bench_pipeline import random_model, synchronize

from modeling_dina import DiNaConfig, DiNaRewardModel

LEVELS = {1: [0.4], 3: [0.2, 0.5, 0.7]}
TEXT_TOKENS = 77  # CLIP-L + CLIP-G, before the T5 tokens (SPEC §4)


def taps(layers: int) -> list[int]:
    """The released taps [4, 8, 12] at 12 layers; three evenly spaced ones ending at the last block otherwise."""
    step = max(1, layers // 3)
    return sorted({max(0, layers - i * step) for i in (2, 1, 0)})


# ---------------------------------------------------------------------------------------------- the authors' path


def authors_backbone(backbone, latents, embeds, pooled, timesteps):
    """`SD3Backbone.forward` of the authors: embedders, the blocks, the tapped streams."""
    hidden = backbone.pos_embed(latents)
    temb = backbone.time_text_embed(timesteps, pooled)
    context = backbone.context_embedder(embeds)
    visual = [hidden] if backbone.visual_layers[0] == 0 else []
    text = [context] if backbone.text_layers[0] == 0 else []
    for index, block in enumerate(backbone.transformer_blocks, start=1):
        context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb)
        if index in backbone.visual_layers:
            visual.append(hidden)
        if index in backbone.text_layers:
            text.append(context)
    return temb, visual, text


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.view(b, n, num_heads, d // num_heads).transpose(1, 2).contiguous()


def _attend(q, k, v, num_heads: int) -> torch.Tensor:
    out = F.scaled_dot_product_attention(_heads(q, num_heads), _heads(k, num_heads), _heads(v, num_heads))
    b, h, n, hd = out.shape
    return out.transpose(1, 2).contiguous().view(b, n, h * hd)


def authors_cross_attention(block, queries, visual, text=None):
    """`CrossAttnBlockVGated.forward`: norms, value gates, one attention per context, summed, residual."""
    q = block.to_q(block.norm_q(queries))
    visual = block.norm_v(visual)
    v = block.to_v_vis(visual)
    if block.gate_vis is not None:
        v = v * torch.sigmoid(block.gate_vis(visual))
    out = _attend(q, block.to_k_vis(visual), v, block.num_heads)
    if text is not None:
        text = block.norm_t(text)
        v = block.to_v_text(text)
        if block.gate_text is not None:
            v = v * torch.sigmoid(block.gate_text(text))
        out = out + _attend(q, block.to_k_text(text), v, block.num_heads)
    return queries + block.to_out(out)


def authors_head(head, visual_per_level, text_per_level, temb_per_level):
    """`RewardHead.forward_ensemble` (`forward` for one level): each level's adapter tokens, concatenated on the
    token axis, then the attention blocks, the feed-forward and the read-out (in the model's dtype) once."""

    def tokens(adapters, agg, features, temb):  # `RewardHead._build_view_tokens`, one stream
        return agg(torch.cat([adapter(x, temb) for adapter, x in zip(adapters, features)], dim=-1))

    visual, text = [], []
    for features_v, features_t, temb in zip(visual_per_level, text_per_level, temb_per_level):
        visual.append(tokens(head.layer_adapters_visual, head.agg_visual, features_v, temb))
        text.append(tokens(head.layer_adapters_text, head.agg_text, features_t, temb))
    visual, text = torch.cat(visual, dim=1), torch.cat(text, dim=1)
    queries = head.query_tokens.expand(visual.shape[0], -1, -1)
    queries = authors_cross_attention(head.attn1, queries, visual, text)
    queries = authors_cross_attention(head.attn2, queries, visual)
    queries = queries + head.ff(head.norm_ff(queries))
    return head.head(queries).mean(dim=1)


def authors_reward(model: DiNaRewardModel, latents, embeds, pooled, noise, levels: list[float]) -> torch.Tensor:
    """`DRMInferencer.reward` (one level) and `SD3RewardModel.forward_ensemble` (K levels): snap each level to the
    nearest scheduler sigma, noise, cast to the model's dtype, one backbone call per level, the head."""
    grid = model.noise_grid
    batch, temb, visual, text = latents.shape[0], [], [], []
    for u in levels:
        idx = torch.argmin((grid.sigmas[None, :] - torch.tensor([u] * batch)[:, None]).abs(), dim=1)
        sigma = grid.sigmas[idx].view(-1, 1, 1, 1).to(latents.device)
        noisy = ((1.0 - sigma) * latents + sigma * noise).to(model.dtype)
        level = authors_backbone(model.backbone, noisy, embeds, pooled, grid.timesteps[idx].to(latents.device))
        temb.append(level[0])
        visual.append(level[1])
        text.append(level[2])
    return authors_head(model.reward_head, visual, text, temb).squeeze(-1)


# ---------------------------------------------------------------------------------------------- measuring


def ours(model: DiNaRewardModel, latents, embeds, pooled, noise, levels: list[float]) -> torch.Tensor:
    level = {"noise_level": levels[0]} if len(levels) == 1 else {"noise_levels": levels}
    return model.score_clean(latents, embeds, pooled, noise=noise, **level).rewards


def inputs(model: DiNaRewardModel, size: int, images: int, device, seed: int = 0):
    """Clean fp32 latents, their noise, and a prompt encoding in the model's dtype (CLIP 77 + T5 tokens)."""
    config, generator = model.config, torch.Generator().manual_seed(seed)
    side = size // 8
    latents = torch.randn(images, model.backbone.latent_channels, side, side, generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    text_width = config.backbone_config["joint_attention_dim"]
    embeds = torch.randn(images, TEXT_TOKENS + config.max_sequence_length, text_width, generator=generator)
    pooled = torch.randn(images, config.backbone_config["pooled_projection_dim"], generator=generator)
    return latents.to(device), embeds.to(device, model.dtype), pooled.to(device, model.dtype), noise.to(device)


def timed(score, args: tuple) -> tuple[float, torch.Tensor]:
    """One timed call (no autograd, as both implementations score) and its rewards."""
    with torch.no_grad():
        synchronize(args[1].device)
        start = time.perf_counter()
        rewards = score(*args)
        synchronize(args[1].device)
    return time.perf_counter() - start, rewards.float()


@contextmanager
def eager(model: DiNaRewardModel):
    """Run `model`'s modules uncompiled inside the block (the authors' path on a model whose blocks we compiled)."""
    saved = {module: module._compiled_call_impl for module in model.modules()}
    for module in saved:
        module._compiled_call_impl = None
    try:
        yield
    finally:
        for module, compiled in saved.items():
            module._compiled_call_impl = compiled


def measure(args, dtype: torch.dtype, device) -> list[str]:
    """One model; per case the authors' path (LoRA unfused), ours eager and, with `--compile`, ours compiled (LoRA
    fused), in interleaved rounds: the machine's load drifts alike for all three."""
    config = DiNaConfig(num_backbone_layers=args.layers, visual_layers=taps(args.layers), text_layers=taps(args.layers))
    model = random_model(config, device, dtype)
    cases = [(size, k) for size in args.sizes for k in args.ensembles]
    data = {size: inputs(model, size, args.images, device) for size in args.sizes}
    paths = {"authors": authors_reward, "ours": ours}
    if args.compile:
        paths["ours compiled"] = ours
    best = {(path, case): float("inf") for path in paths for case in cases}
    rewards = {}
    for round_ in range(args.repeats + 1):  # round 0 warms up (and compiles), and its rewards are compared
        for path, score in paths.items():
            model.fuse_reward_lora(path != "authors")  # in bf16 each unfuse leaves round-off: timing only after round 0
            if path == "ours compiled" and round_ == 0:
                model.compile_regions()
            with eager(model) if path != "ours compiled" else nullcontext():
                for size, k in cases:
                    seconds, out = timed(score, (model, *data[size], LEVELS[k]))
                    rewards.setdefault((path, (size, k)), out)
                    if round_:
                        best[path, (size, k)] = min(best[path, (size, k)], seconds)
    name = str(dtype).removeprefix("torch.")
    rows = []
    for case in cases:
        authors = best["authors", case]
        cells = [f"{best[path, case]:.3f} s ({authors / best[path, case]:.2f}×)" for path in paths if path != "authors"]
        delta = max((rewards[p, case] - rewards["authors", case]).abs().max().item() for p in paths)
        rows.append(f"| {name} | {case[0]}² | {case[1]} | {authors:.3f} s | {' | '.join(cells)} | {delta:.1e} |")
        print(rows[-1], flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12, help="MMDiT blocks kept (released: 12)")
    parser.add_argument("--sizes", default="256,512", help="image sides in pixels (latent side x 8)")
    parser.add_argument("--ensembles", default="1,3", help="K noise levels: 1 and/or 3")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--images", type=int, default=1, help="images per call")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up round; the best counts")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip ours + torch.compile")
    parser.add_argument("--device", default=None, help="default: the accelerator if there is one, else cpu")
    args = parser.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.ensembles = [int(k) for k in args.ensembles.split(",")]
    if any(k not in LEVELS for k in args.ensembles):
        parser.error(f"--ensembles must be among {sorted(LEVELS)}")
    accelerator = torch.accelerator.current_accelerator()
    device = torch.device(args.device or (accelerator.type if accelerator is not None else "cpu"))
    torch.set_num_threads(args.threads)
    rows = [row for dtype in args.dtypes.split(",") for row in measure(args, getattr(torch, dtype), device)]
    compiled = " | ours + torch.compile" if args.compile else ""
    print(
        f"\n{args.layers} MMDiT blocks of SD3.5-M + LoRA r64 + head, random weights, {args.images} image(s) per call, "
        f"{device} ({torch.get_num_threads()} threads); best of {args.repeats} interleaved rounds; "
        "in brackets: the authors' time / ours\n"
    )
    print(f"| dtype | size | K | authors | ours{compiled} | max abs Δ reward vs authors |")
    print("|---|---|---:|---:|---:|" + ("---:|" if args.compile else "") + "---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
