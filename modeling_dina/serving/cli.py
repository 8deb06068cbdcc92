"""`dina serve`: the reward model behind HTTP, one process (uvicorn) or Ray Serve replicas (`--replicas N`)."""

from __future__ import annotations

import argparse


def add_serve_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve the reward model over HTTP (DRM v1 `POST /v1/score`, `POST /v1/score_images`, `GET /healthz`)",
    )
    p.add_argument("--model", required=True, help="DiNa model folder or Hub id")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu (default: where the pipeline loads)")
    p.add_argument("--dtype", default=None, help="reward model dtype, e.g. bfloat16 (the VAE stays float32)")
    p.add_argument("--max-batch-size", type=int, default=8, help="samples per backbone call")
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a batch waits for more requests")
    p.add_argument("--random-noise", action="store_true", help="a fresh noise draw per request without `seeds`")
    p.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body accepted")
    p.add_argument("--prompt-cache-size", type=int, default=1024, help="prompts whose embeddings are cached")
    p.add_argument("--no-fuse", action="store_true", help="keep the reward LoRA unfused")
    p.add_argument("--compile", action="store_true", help="torch.compile each kept block and the head")
    p.add_argument("--replicas", type=int, default=0, help="run N Ray Serve replicas (needs `dina-lrm[serve]`)")
    p.add_argument("--ray-num-cpus", type=int, default=None, help="CPUs of the local Ray cluster started here")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=run_serve)


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        device=args.device,
        dtype=args.dtype,
        fuse=not args.no_fuse,
        compile=args.compile,
        random_noise=args.random_noise,
        prompt_cache_size=args.prompt_cache_size,
    )


def run_serve(args: argparse.Namespace) -> None:
    if args.max_batch_size < 1:
        raise SystemExit("--max-batch-size must be at least 1")
    if args.replicas < 0:
        raise SystemExit("--replicas must be non-negative")
    max_body_bytes = int(args.max_body_mb * 2**20)
    if args.replicas:
        from .ray_deployment import run_ray_serve

        run_ray_serve(args, engine_kwargs(args), max_body_bytes)
        return
    import uvicorn

    from .app import create_app
    from .batching import MicroBatcher
    from .engine import RewardEngine

    engine = RewardEngine(args.model, **engine_kwargs(args))
    batcher = MicroBatcher(engine, args.max_batch_size, args.max_wait_ms)
    app = create_app(engine, batcher, max_body_bytes=max_body_bytes)
    # uvicorn's own SIGTERM/SIGINT handling: stop accepting, let in-flight requests finish, then exit.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    engine.close()


__all__ = ["add_serve_parser", "run_serve"]
