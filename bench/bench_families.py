"""CPU scoring time of one image per backbone family at its released configuration, random weights (fp32, no
download): latents and prompt embeddings in, reward out (prompt encoding and the VAE not included).

A full-depth backbone does not fit this machine's memory next to the others' work, so the script times the model
with 1 and with 2 kept blocks (real widths, real token counts) and the reward head at its full size, and reports
`embedders + 1 block + (N - 1) x (one more block) + head` for the configured depth N: the blocks of one family are
identical, so the extrapolation is linear by construction.

    python bench/bench_families.py --size 512
"""

import argparse
import time

import torch

from modeling_dina import DiNaConfig, DiNaRewardModel
from modeling_dina.backbones import backbone_class
from modeling_dina.reward_head import DiNaRewardHead

CONFIGS = {
    "sd3": "hub_configs/dina-sd35m-12layers",
    "flux": "hub_configs/dina-flux1dev-19layers",
    "zimage": "hub_configs/dina-zimage-turbo-16layers",
    "qwenimage": "hub_configs/dina-qwenimage-20layers",
}
TEXT_TOKENS = {"sd3": 77 + 128, "flux": 128, "zimage": 128, "qwenimage": 128}  # at max_sequence_length 128


def random_model(config: DiNaConfig, **overrides) -> DiNaRewardModel:
    config = DiNaConfig(**{**config.to_dict(), **overrides})
    with torch.device("meta"):
        model = DiNaRewardModel(config)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02, generator=generator)
        for buffer in model.buffers():  # e.g. SD3's sin-cos position table: any finite values time the same
            buffer.zero_()
    return model.eval()


def inputs(config: DiNaConfig, family: str, size: int):
    cls, cfg = backbone_class(family), config.backbone_config
    channels = cfg["in_channels"] // 4 if family in ("flux", "qwenimage") else cfg["in_channels"]
    latents = torch.randn(1, channels, size // 8, size // 8)
    width, pooled_width = cls.prompt_widths(cfg)
    embeds = torch.randn(1, TEXT_TOKENS[family], width)
    pooled = torch.randn(1, pooled_width) if cls.uses_pooled else None
    mask = torch.ones(1, TEXT_TOKENS[family], dtype=torch.bool) if cls.uses_text_mask else None
    return latents, embeds, pooled, mask


def seconds(fn, repeats: int) -> float:
    """Best of `repeats` timed calls, after one warm-up call when `repeats > 1`."""
    if repeats > 1:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_family(family: str, size: int, repeats: int) -> dict:
    config = DiNaConfig.from_pretrained(CONFIGS[family])
    latents, embeds, pooled, mask = inputs(config, family, size)
    timestep = torch.tensor([400.0])
    backbone_times = []
    for depth in (1, 2):
        backbone = random_model(config, num_backbone_layers=depth, visual_layers=[depth], text_layers=[depth]).backbone
        with torch.no_grad():
            backbone_times.append(seconds(lambda b=backbone: b(latents, timestep, embeds, pooled, mask), repeats))
        del backbone
    model = random_model(config, num_backbone_layers=1, visual_layers=[1], text_layers=[1])
    with torch.no_grad():
        features = model.backbone(latents, timestep, embeds, pooled, mask)
    head = DiNaRewardHead.from_config(config, model.backbone.token_dim, model.backbone.temb_dim).eval()
    del model
    visual = [features.visual[0]] * len(config.visual_layers)
    text = [features.text[0]] * len(config.text_layers)
    with torch.no_grad():
        head_time = seconds(lambda: head(visual, text, features.temb, text_mask=features.text_mask), repeats)
    per_block = max(backbone_times[1] - backbone_times[0], 0.0)
    depth = config.num_backbone_layers
    return {
        "family": family,
        "layers": depth,
        "image tokens": features.visual[0].shape[1],
        "text tokens": features.text[0].shape[1],
        "1 block (s)": backbone_times[0],
        "per extra block (s)": per_block,
        "head (s)": head_time,
        "total (s)": backbone_times[0] + (depth - 1) * per_block + head_time,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (latents are size / 8)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls (best kept); 1 = no warm-up either")
    parser.add_argument("--families", default=",".join(CONFIGS))
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    print(f"{torch.get_num_threads()} threads, fp32, {args.size}^2 image, batch 1, best of {args.repeats}")
    rows = [bench_family(family, args.size, args.repeats) for family in args.families.split(",")]
    print("| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
