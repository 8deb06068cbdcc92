"""`dina serve`: DiNa-LRM behind HTTP.

- `protocol.py` — DRM HTTP v1 and the text + image route: parsing, validation (`RequestError` -> 4xx), the noise rule.
- `engine.py` — `RewardEngine`: loads, fuses, warms up; requests -> `ScoreItem`s; scores groups of items.
- `batching.py` — `MicroBatcher`: dynamic micro-batching for the single-process server.
- `app.py` — the FastAPI app (`/healthz`, `/v1/score`, `/v1/score_images`), shared with the Ray replicas.
- `ray_deployment.py` — `--replicas N`: the app as a Ray Serve deployment.
- `client.py` — `DiNaRemoteReward` and the DRM v1 client.

Importing this package needs only the core dependencies; the server modules need the `serve` extra.
"""
