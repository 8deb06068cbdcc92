"""Aspect-ratio buckets for the training cache: the dense buckets of about `resolution**2` pixels (each image
centre-cropped to its pair's bucket) and the released recipe's 13 fixed buckets (stretched with LANCZOS)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def make_buckets(
    resolution: int, multiple: int, *, max_aspect_ratio: float = 3.0, max_side: int | None = None
) -> list[tuple[int, int]]:
    """`(width, height)` sizes, both multiples of `multiple` and at most `max_side`, of about `resolution**2` pixels
    with aspect ratios up to `max_aspect_ratio`."""
    if resolution < multiple or max_aspect_ratio < 1:
        raise ValueError(
            f"need resolution >= {multiple} and max_aspect_ratio >= 1, got {resolution}, {max_aspect_ratio}."
        )
    limit = max_side or math.ceil(resolution * math.sqrt(max_aspect_ratio))
    buckets = set()
    for height in range(multiple, limit + 1, multiple):
        width = min(max(multiple, round(resolution**2 / height / multiple) * multiple), limit // multiple * multiple)
        if 1 / max_aspect_ratio <= width / height <= max_aspect_ratio:
            buckets.add((width, height))
    if not buckets:
        raise ValueError(f"no bucket fits resolution {resolution} with sides <= {limit}")
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest (in log scale) to `width / height`."""
    target = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - target), -b[0] * b[1]))


# The released recipe's buckets (`(width, height)`, SD3 multiples): seven at about 1024², three at 512², three at
# 256². A pair goes to the largest tier whose smallest bucket its smaller image covers, there to the nearest aspect
# ratio (ratios within `RELEASED_ASPECT_TOLERANCE` of the best count as equal, the first listed wins), and is
# stretched to it (LANCZOS).
RELEASED_BUCKETS = {
    1024: [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344)],
    512: [(512, 512), (576, 448), (448, 576)],
    256: [(256, 256), (288, 224), (224, 288)],
}
RELEASED_ASPECT_TOLERANCE = 0.03
RELEASED_MIN_AREA = 256 * 256
BUCKET_POLICIES = ("dense", "released")


def released_bucket(aspect: float, area: int) -> tuple[int, int] | None:
    """The released bucket for an image (or pair) of `aspect` = width / height and `area` pixels; None below 256²."""
    if area < RELEASED_MIN_AREA:
        return None
    tiers = sorted(RELEASED_BUCKETS.items(), reverse=True)
    covered = [tier for _, tier in tiers if area >= min(w * h for w, h in tier)]
    candidates = covered[0]
    best = min(abs(w / h - aspect) for w, h in candidates)
    return next(b for b in candidates if abs(b[0] / b[1] - aspect) <= best + RELEASED_ASPECT_TOLERANCE)


def pair_bucket(sizes, buckets, policy: str) -> tuple[int, int] | None:
    """One `(width, height)` bucket for both images of a pair, from their mean aspect ratio."""
    aspect = math.sqrt(math.prod(w / h for h, w in sizes))
    if policy == "dense":
        return nearest_bucket(aspect, 1.0, buckets)
    return released_bucket(aspect, min(h * w for h, w in sizes))


__all__ = ["BUCKET_POLICIES", "RELEASED_BUCKETS", "make_buckets", "nearest_bucket", "pair_bucket", "released_bucket"]
