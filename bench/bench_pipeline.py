"""Scoring throughput of `DiNaRewardPipeline` on latents (no VAE): images/s, peak memory and achieved FLOP/s next to
this machine's own measured matmul FLOP/s (the ceiling), for the tiny test model and an SD3.5-M-shaped 12-layer DiNa
model with random weights, for K = 1 and K = 3 noise levels, LoRA fused or not (or fused and `torch.compile`d:
`--lora unfused,fused,compiled`), fp32 or bf16.

    nice python bench/bench_pipeline.py --quick
    python bench/bench_pipeline.py --models sd35m --sizes 256,512 --ensembles 1,3 --dtypes bfloat16 --images 4

Each case makes `--repeats` timed calls and reports the best (first-call set-up and other processes on a shared
machine only ever add time) and the median. FLOPs are counted with `torch.utils.flop_counter.FlopCounterMode` on a
`meta`-device copy of the reward model (no compute), per image. Peak memory is what the scoring calls add over what
was resident before them: on an accelerator `max_memory_allocated`, on the CPU the process RSS sampled every 2 ms
(after `malloc_trim`, so freed heap is returned).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import threading
import time
from dataclasses import dataclass

import psutil
import torch
from diffusers.models.embeddings import PatchEmbed
from torch.utils.flop_counter import FlopCounterMode

from modeling_dina import DiNaConfig, DiNaRewardModel
from modeling_dina.pipeline_dina import DiNaRewardPipeline
from modeling_dina.tiny_sd3 import build_tiny_sd3_components

ENSEMBLE = {1: None, 3: [0.2, 0.5, 0.7]}
TINY = {"num_backbone_layers": 2, "visual_layers": [1, 2], "text_layers": [1, 2], "lora_rank": 4, "lora_alpha": 8}
LORA_LABELS = {(False, False): "unfused", (True, False): "fused", (True, True): "fused + compiled"}
TINY_SIDE = 32  # pixels: the tiny base's whole position table (16 latent pixels a side)


@dataclass
class Case:
    model: str
    size: int
    k: int
    fused: bool
    dtype: torch.dtype
    compiled: bool = False  # fused, and the backbone and head through `torch.compile`


def quick_cases() -> list[Case]:
    """Every tiny case; SD3.5-M-shaped in bf16 at 256 (K = 1, 3) and 512 (K = 1), fused or not, and in fp32 at 256
    (K = 1): a few minutes on a 2-core CPU."""
    both = (False, True)
    cases = [Case("tiny", TINY_SIDE, k, f, d) for d in (torch.float32, torch.bfloat16) for k in (1, 3) for f in both]
    cases += [Case("sd35m", 256, 1, f, torch.float32) for f in both]
    cases += [Case("sd35m", s, k, f, torch.bfloat16) for s, k in ((256, 1), (256, 3), (512, 1)) for f in both]
    return cases


def build_model(name: str, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> DiNaRewardModel:
    """The tiny test model, or the released SD3.5-M 12-layer architecture with random weights (N(0, 0.02) matrices,
    unit norm scales, zero biases)."""
    if name == "tiny":
        transformer = build_tiny_sd3_components(seed=seed)["transformer"]
        model = DiNaRewardModel.from_base(transformer, head_num_attention_heads=4, max_sequence_length=16, **TINY)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # LoRA B starts at zero: perturb, so that fusing it changes the weights
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(0.1 * torch.randn(param.shape, generator=generator))
        return model.to(device=device, dtype=dtype).eval()
    return random_model(DiNaConfig(), device, dtype, seed)


def random_model(config: DiNaConfig, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> DiNaRewardModel:
    """An SD3-family DiNa model of `config`'s architecture with random weights (N(0, 0.02) matrices, unit norm
    scales, zero biases), allocated straight on `device` in `dtype`."""
    with torch.device("meta"):
        model = DiNaRewardModel(config)
    # Allocate straight in the target dtype: an fp32 copy of 1.4B parameters first would double the peak.
    model = model.to(dtype).to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim > 1:
                param.normal_(0.0, 0.02, generator=generator)
            else:  # norm scales at one, biases at zero: activations keep a realistic range (no denormals)
                param.fill_(1.0 if name.endswith("weight") else 0.0)
        # `to_empty` leaves buffers uninitialised too: recompute the sin-cos position table.
        cfg = model.config.backbone_config
        table = PatchEmbed(
            height=cfg["sample_size"],
            width=cfg["sample_size"],
            patch_size=cfg["patch_size"],
            in_channels=cfg["in_channels"],
            embed_dim=model.backbone.token_dim,
            pos_embed_max_size=cfg["pos_embed_max_size"],
        ).pos_embed
        model.backbone.pos_embed.pos_embed.copy_(table)
    return model.eval()


def inputs(model: DiNaRewardModel, case: Case, images: int, device, dtype, generator=None):
    """Clean latents and a prompt encoding of the model's shapes (CLIP 77 tokens + T5, as the SD3 pipeline builds)."""
    config, backbone = model.config, model.backbone
    clip_tokens = 16 if case.model == "tiny" else 77
    side = case.size // (2 if case.model == "tiny" else 8)
    latents = torch.randn(images, backbone.latent_channels, side, side, generator=generator).to(device, dtype)
    embeds = torch.randn(
        1, clip_tokens + config.max_sequence_length, config.backbone_config["joint_attention_dim"], generator=generator
    ).to(device, dtype)
    pooled = torch.randn(1, config.backbone_config["pooled_projection_dim"], generator=generator).to(device, dtype)
    return latents, embeds, pooled


_META_MODELS: dict[str, DiNaRewardModel] = {}


def flops_per_image(case: Case, images: int) -> float:
    """FLOPs of one reward-model call, counted on a meta-device copy (shapes only, no compute), per image."""
    if case.model not in _META_MODELS:
        if case.model == "tiny":
            _META_MODELS["tiny"] = build_model("tiny", "cpu", torch.float32).to("meta")
        else:
            with torch.device("meta"):
                _META_MODELS[case.model] = DiNaRewardModel(DiNaConfig())
    model = _META_MODELS[case.model]
    model.fuse_reward_lora(case.fused)
    latents, embeds, pooled = inputs(model, case, images, "meta", torch.float32)
    timesteps = torch.full((case.k,), 500.0, device="meta")
    # Grad mode on: FlopCounterMode's module tracking fails under no_grad; meta tensors cost nothing either way.
    with FlopCounterMode(display=False) as counter:
        model(
            latents.expand(case.k, *latents.shape), timesteps, embeds.expand(images, -1, -1), pooled.expand(images, -1)
        )
    return counter.get_total_flops() / images


def matmul_flops(device, dtype, n: int = 2048, repeats: int = 10) -> float:
    """This machine's matmul FLOP/s: the best of `repeats` timed `n x n` products."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def synchronize(device) -> None:
    if torch.device(device).type != "cpu":
        torch.accelerator.synchronize()


class PeakMemory:
    """Peak memory added during the `with` block (bytes): accelerator allocator stats, or sampled RSS on the CPU."""

    def __init__(self, device):
        self.cpu = torch.device(device).type == "cpu"
        self.peak = 0

    def __enter__(self):
        gc.collect()
        if self.cpu:
            _malloc_trim()
            self.process = psutil.Process()
            self.base = self.process.memory_info().rss
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        else:
            torch.accelerator.empty_cache()
            torch.accelerator.reset_peak_memory_stats()
            self.base = torch.accelerator.memory_allocated()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss - self.base)
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.cpu:
            self.running = False
            self.thread.join()
        else:
            self.peak = torch.accelerator.max_memory_allocated() - self.base


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: RSS may then include freed heap from earlier cases
        pass


def run_case(pipe: DiNaRewardPipeline, case: Case, args, device) -> dict:
    tiny = case.model == "tiny"
    images = args.images or (8 if tiny else 1)
    repeats = args.repeats or (5 if tiny else 2)
    model = pipe.reward_model
    model.fuse_reward_lora(case.fused)
    if case.compiled and model.backbone._compiled_call_impl is None:
        model.backbone.compile()
        model.reward_head.compile()
    latents, embeds, pooled = inputs(model, case, images, device, case.dtype, torch.Generator().manual_seed(0))
    level = {"noise_levels": ENSEMBLE[case.k]} if case.k > 1 else {"noise_level": 0.4}
    seconds = []
    with PeakMemory(device) as memory:
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            rewards = pipe(
                latents=latents, prompt_embeds=embeds, pooled_prompt_embeds=pooled, batch_size=images, **level
            ).rewards
            synchronize(device)
            seconds.append(time.perf_counter() - start)
    # The best call: first-call set-up and other processes on a shared machine only ever add time.
    return {
        "images_per_s": images / min(seconds),
        "median_ms": 1000 * sorted(seconds)[len(seconds) // 2] / images,
        "peak_mib": memory.peak / 2**20,
        "flops": flops_per_image(case, images),
        "rewards": rewards,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,sd35m", help="comma list of tiny, sd35m")
    parser.add_argument("--sizes", default="256,512", help="image sides in pixels (latent side x 8) for sd35m")
    parser.add_argument("--ensembles", default="1,3", help="K noise levels: 1 and/or 3")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--lora", default="unfused,fused", help="comma list of unfused, fused, compiled")
    parser.add_argument("--quick", action="store_true", help="the curated subset of `quick_cases` (ignores the above)")
    parser.add_argument("--images", type=int, default=None, help="images per call (default: 8 tiny, 1 sd35m)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed calls per case, the best counts (5 tiny, 2 sd35m)"
    )
    parser.add_argument("--device", default=None, help="default: the accelerator if there is one, else cpu")
    args = parser.parse_args()
    accelerator = torch.accelerator.current_accelerator()
    device = torch.device(args.device or (accelerator.type if accelerator is not None else "cpu"))

    if args.quick:
        cases = quick_cases()
    else:
        cases = [
            Case(
                model,
                TINY_SIDE if model == "tiny" else size,
                k,
                lora != "unfused",
                getattr(torch, dtype),
                lora == "compiled",
            )
            for model in args.models.split(",")
            for dtype in args.dtypes.split(",")
            for size in ([TINY_SIDE] if model == "tiny" else [int(s) for s in args.sizes.split(",")])
            for k in [int(k) for k in args.ensembles.split(",")]
            for lora in args.lora.split(",")
        ]
        cases = list({(c.model, c.size, c.k, c.fused, c.dtype, c.compiled): c for c in cases}.values())
    if any(case.k not in ENSEMBLE for case in cases):
        parser.error(f"--ensembles must be among {sorted(ENSEMBLE)}")
    # One model per (model, dtype), its unfused cases first: LoRA is merged once and never unmerged (in bf16 an
    # unmerge leaves rounding error in the base weights).
    groups = list(dict.fromkeys((case.model, case.dtype) for case in cases))
    cases.sort(key=lambda case: (groups.index((case.model, case.dtype)), case.fused, case.compiled))

    ceilings = {}
    for dtype in dict.fromkeys(case.dtype for case in cases):
        ceilings[dtype] = matmul_flops(device, dtype)
        print(f"matmul ceiling {dtype}: {ceilings[dtype] / 1e9:,.1f} GFLOP/s", flush=True)

    rows, pipe, built, unfused = [], None, None, {}
    for case in cases:
        if built != (case.model, case.dtype):
            pipe = None
            gc.collect()
            start = time.perf_counter()
            pipe = DiNaRewardPipeline(reward_model=build_model(case.model, device, case.dtype))
            pipe.set_progress_bar_config(disable=True)
            built = (case.model, case.dtype)
            print(f"built {case.model} {case.dtype} in {time.perf_counter() - start:.1f}s", flush=True)
        result = run_case(pipe, case, args, device)
        if not torch.isfinite(result["rewards"]).all():
            raise RuntimeError(f"non-finite rewards for {case}: the benchmark model is broken.")
        key = (case.model, case.size, case.k, case.dtype)
        delta = ""
        if not case.fused:
            unfused[key] = result["rewards"]
        elif key in unfused:
            delta = f"{(result['rewards'].float() - unfused[key].float()).abs().max().item():.2e}"
        achieved = result["flops"] * result["images_per_s"]
        row = (
            f"| {case.model} | {case.size}² | {case.k} | {LORA_LABELS[case.fused, case.compiled]} "
            f"| {str(case.dtype).removeprefix('torch.')} | {result['images_per_s']:.3g} "
            f"| {1000 / result['images_per_s']:,.0f} | {result['median_ms']:,.0f} "
            f"| {result['peak_mib']:,.0f} | {result['flops'] / 1e9:,.3g} | {achieved / 1e9:,.3g} "
            f"| {100 * achieved / ceilings[case.dtype]:.2g}% | {delta} |"
        )
        rows.append(row)
        print(row, flush=True)

    print(
        f"\ndevice: {device} ({torch.get_num_threads()} threads); images per call and timed calls per case: "
        f"{args.images or '8 tiny / 1 sd35m'} and {args.repeats or '5 tiny / 2 sd35m'}; images/s, ms/image and "
        "GFLOP/s from the best call"
    )
    print(
        ", ".join(
            f"matmul ceiling {str(d).removeprefix('torch.')}: {c / 1e9:,.1f} GFLOP/s" for d, c in ceilings.items()
        )
    )
    print(
        "\n| model | size | K | LoRA | dtype | images/s | ms/image | median ms/image | peak MiB | GFLOP/image "
        "| GFLOP/s | of ceiling "
        "| max abs Δ reward, fused vs unfused |"
    )
    print("|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
