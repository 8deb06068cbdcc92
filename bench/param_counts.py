"""Parameter counts of a DiNa config (built on the `meta` device: no memory, no download) and the size on disk of
its saved LoRA + head, in fp32 and bf16.

    python bench/param_counts.py hub_configs/dina-sd35m-12layers
    (also hub_configs/dina-flux1dev-19layers, dina-zimage-turbo-16layers, dina-qwenimage-20layers)
"""

import argparse
import os
import tempfile

import torch
from safetensors.torch import save_file

from modeling_dina import DiNaConfig, DiNaRewardModel


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a folder or config.json of a DiNaConfig")
    args = parser.parse_args()
    with torch.device("meta"):
        model = DiNaRewardModel(DiNaConfig.from_pretrained(args.config))
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    head = sum(p.numel() for p in model.reward_head.parameters())
    total = sum(p.numel() for p in model.parameters())
    print(f"| part | parameters |\n|---|---:|\n| frozen base (kept blocks + embedders) | {total - lora - head:,} |")
    print(f"| LoRA | {lora:,} |\n| reward head | {head:,} |\n| total | {total:,} |")
    # Materialise only what save_pretrained writes (LoRA + head), never the frozen base, to measure the real file size.
    for dtype in (torch.float32, torch.bfloat16):
        state = {k: torch.zeros(v.shape, dtype=dtype) for k, v in model.trainable_state_dict().items()}
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.safetensors")
            save_file(state, path)
            print(f"saved LoRA + head, {str(dtype).removeprefix('torch.')}: {os.path.getsize(path) / 2**20:,.1f} MiB")
        del state


if __name__ == "__main__":
    main()
