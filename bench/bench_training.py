"""Training throughput and memory of DiNa-LRM on tiny SD3 components: cached vs uncached data, activation
checkpointing off vs on.

    python bench/bench_training.py [--steps 30] [--batch-size 8] [--image-size 64] [--threads 1]

"cached" trains on `cache_preference_dataset` output (no encoder in the loop); "uncached" encodes each batch's
images (VAE) and prompts (CLIP x2 + T5) inside the training step, in the collator. Every configuration runs in a
fresh subprocess so that its peak resident memory (`ru_maxrss`) is its own. Also reported: the bytes the forward
pass saves for backward (what activation checkpointing trades for recomputation), and on CUDA the peak allocated
memory. Steps/s is measured between optimizer steps after `--warmup` steps.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

CONFIGS = ("cached", "cached+ckpt", "uncached", "uncached+ckpt")


def render(colour, rng: random.Random, size: int) -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (128, 128, 128))
    r = rng.randint(size // 8, size // 4)
    x, y = rng.randint(r, size - r), rng.randint(r, size - r)
    ImageDraw.Draw(image).ellipse([x - r, y - r, x + r, y + r], fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def prepare(work: str, args) -> None:
    """The tiny base, a raw pair dataset and its cache under `work`."""
    from datasets import Dataset, Features, Image, Value

    from modeling_dina.tiny_sd3 import save_tiny_sd3_pipeline
    from modeling_dina.training import cache_preference_dataset

    latent = args.image_size // 2  # tiny VAE: factor 2
    save_tiny_sd3_pipeline(os.path.join(work, "base"), seed=0, sample_size=latent, pos_embed_max_size=latent // 2)
    rng = random.Random(0)
    rows = {"prompt": [], "chosen": [], "rejected": [], "label": []}
    for _ in range(args.pairs):
        rows["prompt"].append(f"a {rng.choice(['red', 'small', 'large'])} {rng.choice(['circle', 'square', 'cat'])}")
        rows["chosen"].append({"bytes": render((220, 40, 40), rng, args.image_size), "path": None})
        rows["rejected"].append({"bytes": render((40, 40, 220), rng, args.image_size), "path": None})
        rows["label"].append(1.0)
    features = Features({"prompt": Value("string"), "chosen": Image(), "rejected": Image(), "label": Value("float32")})
    raw = Dataset.from_dict(rows, features=features)
    raw.save_to_disk(os.path.join(work, "raw"))
    start = time.perf_counter()
    cache_preference_dataset(
        raw,
        os.path.join(work, "base"),
        os.path.join(work, "cache"),
        max_sequence_length=args.max_sequence_length,
        buckets=[(args.image_size, args.image_size)],
        progress=False,
    )
    print(f"caching {args.pairs} pairs: {time.perf_counter() - start:.1f} s", file=sys.stderr)


class EncodingCollator:
    """The uncached path: VAE latents and prompt embeddings computed for every batch."""

    def __init__(self, pipe, size: int, max_sequence_length: int):
        self.pipe, self.size, self.max_sequence_length = pipe, size, max_sequence_length

    def __call__(self, rows):
        import torch

        from modeling_dina.training.caching import encode_images, encode_prompts, image_to_pixels

        n = len(rows)
        encoded = encode_prompts(
            self.pipe, [r["prompt"] for r in rows], max_sequence_length=self.max_sequence_length, batch_size=n
        )
        latents = {
            side: encode_images(
                self.pipe, torch.stack([image_to_pixels(r[side], (self.size, self.size)) for r in rows]), batch_size=n
            )
            for side in ("chosen", "rejected")
        }
        return {
            "chosen_latents": latents["chosen"],
            "rejected_latents": latents["rejected"],
            "prompt_embeds": encoded.embeds,
            "pooled_prompt_embeds": encoded.pooled,
            "labels": torch.tensor([float(r["label"]) for r in rows]),
        }


def run(config: str, work: str, args) -> dict:
    """Train `args.steps` steps in this process and measure."""
    import torch
    import transformers
    from datasets import load_from_disk
    from transformers import TrainerCallback

    from modeling_dina import DiNaRewardModel
    from modeling_dina.training import DiNaTrainer, DiNaTrainingArguments, load_cached_preferences
    from modeling_dina.training.caching import load_encoders

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    base = os.path.join(work, "base")
    torch.manual_seed(0)
    model = DiNaRewardModel.from_base(
        base, num_backbone_layers=args.layers, visual_layers=[args.layers], text_layers=[args.layers]
    )
    if config.startswith("cached"):
        dataset, collator = load_cached_preferences(os.path.join(work, "cache")), None
    else:
        pipe = load_encoders(base)
        dataset = load_from_disk(os.path.join(work, "raw"))
        collator = EncodingCollator(pipe, args.image_size, args.max_sequence_length)

    class Clock(TrainerCallback):
        """Times optimizer steps and adds up the distinct non-parameter storages saved for backward in each."""

        def __init__(self):
            self.times, self.saved_bytes = [], []
            self.parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}

        def on_step_begin(self, *a, **k):
            self.seen, self.step_bytes = set(self.parameters), 0
            self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda x: x)
            self.hooks.__enter__()

        def pack(self, tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in self.seen:
                self.seen.add(storage.data_ptr())
                self.step_bytes += storage.nbytes()
            return tensor

        def on_step_end(self, *a, **k):
            self.hooks.__exit__(None, None, None)
            self.saved_bytes.append(self.step_bytes)
            self.times.append(time.perf_counter())

    training_args = DiNaTrainingArguments(
        output_dir=os.path.join(work, f"out-{config}"),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=1e-4,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        logging_steps=args.steps,
        activation_checkpointing=config.endswith("+ckpt"),
        dataloader_pin_memory=False,
    )
    clock = Clock()
    trainer = DiNaTrainer(model, training_args, train_dataset=dataset, data_collator=collator, callbacks=[clock])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    assert model.backbone.gradient_checkpointing == config.endswith("+ckpt")
    timed = clock.times[args.warmup :]
    return {
        "config": config,
        "steps_per_s": (len(timed) - 1) / (timed[-1] - timed[0]),
        "saved_for_backward_mib": max(clock.saved_bytes) / 2**20,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=64, help="pixels a side (multiple of 4)")
    parser.add_argument("--layers", type=int, default=3, help="backbone blocks kept (the tiny base has 4)")
    parser.add_argument("--max-sequence-length", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--run", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps - args.warmup < 2:
        parser.error("need at least warmup + 2 steps")
    if args.run:
        print(json.dumps(run(args.run, args.work, args)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or tmp
        prepare(work, args)
        forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--work")]
        results = []
        for config in CONFIGS:
            command = [sys.executable, os.path.abspath(__file__), *forwarded, "--work", work, "--run", config]
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode:
                sys.exit(f"{config} failed:\n{done.stderr[-4000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(
        f"\nDiNa-LRM training, tiny SD3 ({args.layers} blocks), {args.image_size}px images, batch {args.batch_size} "
        f"pairs, {args.steps - args.warmup} timed steps, {args.threads} thread(s)\n"
    )
    print("| data | activation ckpt | steps/s | saved for backward (MiB) | peak RSS (MiB) | CUDA peak (MiB) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        data, _, ckpt = r["config"].partition("+")
        cuda = f"{r['cuda_peak_mib']:.1f}" if r["cuda_peak_mib"] is not None else "-"
        print(
            f"| {data} | {'on' if ckpt else 'off'} | {r['steps_per_s']:.2f} | {r['saved_for_backward_mib']:.1f} | "
            f"{r['peak_rss_mib']:.0f} | {cuda} |"
        )


if __name__ == "__main__":
    main()
