"""Dynamic micro-batching for the single-process server: items that arrive within `max_wait_ms` of the first one
are scored together (`RewardEngine.score_items`: grouped by latent size and noise level, at most `max_batch_size` per
backbone call). Under load the queue fills while a batch runs, so the next batch forms without waiting.
(Ray Serve replicas batch with `serve.batch` instead, see `ray_deployment.py`.)
"""

from __future__ import annotations

import asyncio

from .engine import RewardEngine, ScoreItem


class MicroBatcher:
    def __init__(self, engine: RewardEngine, max_batch_size: int = 8, max_wait_ms: float = 10.0):
        if max_batch_size < 1:
            raise ValueError(f"`max_batch_size` must be at least 1, got {max_batch_size}.")
        if max_wait_ms < 0:
            raise ValueError(f"`max_wait_ms` must be non-negative, got {max_wait_ms}.")
        self.engine, self.max_batch_size, self.max_wait = engine, max_batch_size, max_wait_ms / 1000
        self._queue: asyncio.Queue[tuple[ScoreItem, asyncio.Future]] | None = None
        self._task: asyncio.Task | None = None
        self.batch_sizes: list[int] = []  # items per flush, for tests and the benchmark

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def submit(self, items: list[ScoreItem]) -> list[float]:
        """Rewards of `items` (one request's samples); raises the first item's error if any failed."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        for item, future in zip(items, futures):
            self._queue.put_nowait((item, future))
        return list(await asyncio.gather(*futures))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            pending = [await self._queue.get()]
            deadline = loop.time() + self.max_wait
            # What arrives within the wait (up to one batch), then all that queued meanwhile; `score_items` chunks it.
            while len(pending) < self.max_batch_size:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    pending.append(await asyncio.wait_for(self._queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            while not self._queue.empty():
                pending.append(self._queue.get_nowait())
            self.batch_sizes.append(len(pending))
            items = [item for item, _ in pending]
            try:
                results = await loop.run_in_executor(
                    self.engine.executor, self.engine.score_items, items, self.max_batch_size
                )
            except Exception as err:  # the engine itself failed (not one item): every waiting request learns it
                results = [err] * len(items)
            for (_, future), result in zip(pending, results):
                if future.done():  # the client went away
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)


__all__ = ["MicroBatcher"]
