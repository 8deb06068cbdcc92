"""`dina serve --replicas N`: the same app as a Ray Serve deployment (`pip install "dina-lrm[serve]"`).

Each replica loads its own engine (one GPU per replica when the device is CUDA, else one CPU); Ray's HTTP proxy routes
requests between replicas and `serve.batch` forms each replica's batches (`--max-batch-size`, `--max-wait-ms`), which
`RewardEngine.score_items` then groups by latent size and noise level.
"""

from __future__ import annotations

import asyncio
import signal
import threading

from ray import serve

from .app import create_app
from .engine import RewardEngine, ScoreItem

APP_NAME = "dina"


@serve.deployment
@serve.ingress()
class DiNaReplica:
    def __init__(self, model: str, engine_kwargs: dict, max_batch_size: int, max_wait_ms: float, max_body_bytes: int):
        self.engine = RewardEngine(model, **engine_kwargs)
        self.engine.load()  # the replica counts as started (and is routed to) only once this returns
        self.max_batch_size, self.max_body_bytes = max_batch_size, max_body_bytes
        self._score.set_max_batch_size(max_batch_size)
        self._score.set_batch_wait_timeout_s(max_wait_ms / 1000)

    def __serve_build_asgi_app__(self):
        return create_app(self.engine, self, max_body_bytes=self.max_body_bytes)

    async def submit(self, items: list[ScoreItem]) -> list[float]:
        results = await asyncio.gather(*(self._score(item) for item in items))
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return list(results)

    @serve.batch
    async def _score(self, items: list[ScoreItem]) -> list[float | BaseException]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.engine.executor, self.engine.score_items, items, self.max_batch_size)


def build_app(
    model: str, engine_kwargs: dict, *, replicas: int, max_batch_size: int, max_wait_ms: float, max_body_bytes: int
):
    """The bound Ray Serve application: `replicas` copies, each on a GPU when the device is CUDA, else a CPU."""
    device = engine_kwargs.get("device") or ""
    resources = {"num_gpus": 1} if device.startswith("cuda") else {"num_cpus": 1}
    deployment = DiNaReplica.options(num_replicas=replicas, ray_actor_options=resources)
    return deployment.bind(model, engine_kwargs, max_batch_size, max_wait_ms, max_body_bytes)


def run_ray_serve(args, engine_kwargs: dict, max_body_bytes: int) -> None:
    """Start (or join, with `RAY_ADDRESS`) a Ray cluster, serve until SIGTERM/SIGINT, then shut Serve and Ray down."""
    import ray

    ray.init(num_cpus=args.ray_num_cpus, include_dashboard=False, log_to_driver=args.log_level == "debug")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        app = build_app(
            args.model,
            engine_kwargs,
            replicas=args.replicas,
            max_batch_size=args.max_batch_size,
            max_wait_ms=args.max_wait_ms,
            max_body_bytes=max_body_bytes,
        )
        serve.run(app, name=APP_NAME, route_prefix="/")
        _wait_for_replicas(args.replicas, stop)
        print(
            f"serving {args.model} with {args.replicas} Ray Serve replicas on http://{args.host}:{args.port}",
            flush=True,
        )
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()


def _wait_for_replicas(replicas: int, stop: threading.Event) -> None:
    """`serve.run` returns once the app answers; the other replicas may still be loading their model."""
    while not stop.is_set():
        deployment = serve.status().applications[APP_NAME].deployments[DiNaReplica.name]
        if deployment.status == "DEPLOY_FAILED":
            raise RuntimeError(f"the Ray Serve deployment failed: {deployment.message}")
        if deployment.replica_states.get("RUNNING", 0) >= replicas:
            return
        stop.wait(1.0)


__all__ = ["DiNaReplica", "build_app", "run_ray_serve"]
