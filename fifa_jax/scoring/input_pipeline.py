"""Parallel image decoding for scoring: a thread pool that keeps decoded batches ready.

Choice: threads, not grain. JPEG/PNG decoding and PIL's resize release the GIL, so a
`ThreadPoolExecutor` scales over cores without worker processes, pickling, or the absl-flag
set-up grain's workers need (and grain is not a dependency). Up to `prefetch` batches are in
flight while the accelerator scores the current one, so it never waits on decoding as long as
`num_workers` threads decode faster than the model scores.

An image that fails to load or decode does not stop the run: its slot holds zeros, `ok` is
False and `reason` says why; the caller flags the pair and counts the reason.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np


@dataclasses.dataclass
class Batch:
    """A decoded batch. images: (B, H, W, 3) uint8; ok: (B,) bool; reasons: B strings ("" ok);
    tag: whatever the caller attached to the batch spec (e.g. chunk index and slot ids)."""
    images: np.ndarray
    ok: np.ndarray
    reasons: list[str]
    tag: object


def _decode_one(ref: str, decode: Callable[[str], np.ndarray], shape: tuple[int, int, int]):
    try:
        x = decode(ref)
    except Exception as e:  # noqa: BLE001 - every failure becomes a counted reason
        msg = str(e) if ref in str(e) else f"{ref}: {e}"
        return np.zeros(shape, np.uint8), False, f"undecodable image: {type(e).__name__}: {msg}"
    if x.shape != shape or x.dtype != np.uint8:
        return (np.zeros(shape, np.uint8), False,
                f"undecodable image: {ref}: decoded to {x.shape} {x.dtype}, expected {shape} uint8")
    return x, True, ""


def decoded_batches(specs: Iterable[tuple[Sequence[str], object]],
                    decode: Callable[[str], np.ndarray], image_shape: tuple[int, int, int],
                    num_workers: int = 8, prefetch: int = 4) -> Iterator[Batch]:
    """Decode batches of image refs in a thread pool, yielding them in order.

    Args:
      specs: iterable of (refs, tag); each refs list becomes one Batch of len(refs) images.
      decode: ref -> (H, W, 3) uint8 array (load + resize + crop); exceptions become ok=False.
      image_shape: (H, W, 3), the shape every decoded image must have.
      num_workers: decoding threads.
      prefetch: batches decoded ahead of the consumer.
    """
    if num_workers < 1 or prefetch < 1:
        raise ValueError(f"num_workers and prefetch must be >= 1, got {num_workers}, {prefetch}")
    specs = iter(specs)
    with cf.ThreadPoolExecutor(max_workers=num_workers,
                               thread_name_prefix="fifa-decode") as pool:
        window: collections.deque = collections.deque()

        def submit_next() -> bool:
            spec = next(specs, None)
            if spec is None:
                return False
            refs, tag = spec
            futs = [pool.submit(_decode_one, r, decode, image_shape) for r in refs]
            window.append((futs, tag))
            return True

        for _ in range(prefetch):
            if not submit_next():
                break
        while window:
            futs, tag = window.popleft()
            submit_next()
            results = [f.result() for f in futs]
            images = (np.stack([r[0] for r in results]) if results
                      else np.zeros((0,) + tuple(image_shape), np.uint8))
            yield Batch(images=images, ok=np.array([r[1] for r in results], bool),
                        reasons=[r[2] for r in results], tag=tag)
