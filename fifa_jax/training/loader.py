"""The trainer's input pipeline: global batches of encoded pairs from the encode stage.

    loader = PairLoader(encode_dir, "train", global_batch=2048, seed=0)
    batch = next(loader)            # this host's rows of global batch `loader.step`
    state = loader.get_state()      # JSON-able; save it in the checkpoint
    loader.set_state(state)         # resume: the next batch is the one that would have come

Order: an infinite stream over epochs; epoch e is a permutation of the split's records
(grain's index shuffle seeded with seed + e), epochs concatenated, cut into global batches of
`global_batch` pairs (a batch may straddle two epochs). Global batch b holds stream positions
[b G, (b + 1) G); host p of n reads only rows [p L, (p + 1) L) of it, L = G / n, so the host
count changes who reads what, never the global batch, and the state (`step` = b) is the same
for any host count: a run saved with 2 hosts resumes with 1 on the same global batches.

A batch (numpy, this host's L rows):
  pair_id (L,) int64, prompt_row (L,) int64,
  moments_w, moments_l (L, 2C, h, w): the VAE posterior [mean; logvar] of each image,
  prompt_embeds (L, T, D) [, pooled (L, P) for SDXL],
  and, by `flip`, when the data hold mirrored posteriors:
    "random" (default): moments_w/l are the mirrored image's posterior with probability 1/2,
        drawn per image, winner and loser independently, from (seed, stream position), so a
        resumed run draws the same; flip_w, flip_l (L,) bool say which were mirrored;
    "none": the plain posteriors only.
`empty_prompt` holds the states of "" (caption dropout is the train step's job).
`pair_values` adds per-pair columns computed from pair_id (the train stage's `proxy_prob`).

`epoch_batches()` (validation): one pass in record order, no shuffle, no flips; every batch
has L rows on each host and a `mask` (L,) bool; the last global batch is padded with copies
of record 0 (mask False), so every step has one shape.

Built with grain: `MapDataset.range(N).shuffle(seed).repeat()` for positions, `.batch(G)` of
record indices (cheap ints), `.map_with_index` to read this host's rows through tfds's
`as_data_source` (array_record, random access), `.to_iter_dataset(ReadOptions(num_threads,
prefetch))`: threads read ahead, no worker processes (none need absl flags).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from fifa_jax.training import pair_dataset

STATE_VERSION = 1
FLIP_MODES = ("random", "none")
_FLIP_SALT = np.uint64(0xF11F5EED)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def flip_bits(seed: int, positions: np.ndarray) -> np.ndarray:
    """(n, 2) bool [winner, loser] mirror choices for stream positions, from the seed alone."""
    with np.errstate(over="ignore"):
        h = _mix64(_mix64(np.full(positions.shape, np.uint64(seed) ^ _FLIP_SALT))
                   + positions.astype(np.uint64))
    return np.stack([(h & np.uint64(1)) == 1, (h & np.uint64(2)) == 2], axis=-1)


class PairLoader:
    """Batches of one split of the encode stage's pairs for this host (see module docstring).

    Args:
      encode_dir: the encode stage's output folder (workdir/encode).
      split: "train" | "validation".
      global_batch: pairs per global batch (all hosts together); a multiple of process_count.
      seed: shuffle (and flip) seed.
      process_index, process_count: this host's slice (default: jax's).
      shuffle: False -> epochs in record order (still repeated).
      flip: "random" | "none" (ignored when the data hold no mirrored posteriors).
      num_threads, prefetch: grain ReadOptions (reading threads, batches read ahead).
      pair_values: {key: fn((L,) pair_id) -> (L,) array} added to every batch.
    """

    def __init__(self, encode_dir, split: str, *, global_batch: int, seed: int,
                 process_index: int | None = None, process_count: int | None = None,
                 shuffle: bool = True, flip: str = "random", num_threads: int = 4,
                 prefetch: int = 4, pair_values: dict | None = None):
        if process_index is None or process_count is None:
            import jax
            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if global_batch < 1 or global_batch % process_count:
            raise ValueError(f"global_batch={global_batch} must be a positive multiple of the "
                             f"process count {process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, {process_count})")
        if flip not in FLIP_MODES:
            raise ValueError(f"flip must be one of {FLIP_MODES}, got {flip!r}")
        self.encode_dir, self.split = encode_dir, split
        self.global_batch, self.seed, self.shuffle = int(global_batch), int(seed), bool(shuffle)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.local_batch = self.global_batch // self.process_count
        self.spec = pair_dataset.read_spec(encode_dir)
        self.has_flips = bool(self.spec.get("flip"))
        self.flip = flip if self.has_flips else "none"
        self._pairs = pair_dataset.data_source(encode_dir, "pairs", split)
        self._prompts = pair_dataset.data_source(encode_dir, "prompts",
                                                 pair_dataset.PROMPTS_SPLIT)
        self.num_examples = len(self._pairs)
        if self.num_examples == 0:
            raise ValueError(f"{encode_dir}: split {split!r} is empty")
        self.empty_prompt = pair_dataset.load_empty_prompt(encode_dir)
        self._read_options = dict(num_threads=int(num_threads),
                                  prefetch_buffer_size=int(prefetch))
        self._iter = None
        self._step = 0
        self.pair_values = dict(pair_values or {})

    # -- reading
    def _rows(self) -> slice:
        lo = self.process_index * self.local_batch
        return slice(lo, lo + self.local_batch)

    def read(self, indices, positions=None, flip: str = "none") -> dict[str, np.ndarray]:
        """Records `indices` (record numbers) as a batch dict; `positions` (stream positions)
        seed the random flips."""
        recs = self._pairs.__getitems__([int(i) for i in indices])
        rows = [int(r["prompt_row"]) for r in recs]
        prompts = self._prompts.__getitems__(rows)
        out = {"pair_id": np.array([r["pair_id"] for r in recs], np.int64),
               "prompt_row": np.array(rows, np.int64),
               "prompt_embeds": np.stack([p["prompt_embeds"] for p in prompts])}
        if "pooled" in prompts[0]:
            out["pooled"] = np.stack([p["pooled"] for p in prompts])
        for key, fn in self.pair_values.items():
            out[key] = np.asarray(fn(out["pair_id"]))
        for side in ("w", "l"):
            out[f"moments_{side}"] = np.stack([r[f"moments_{side}"] for r in recs])
            if self.has_flips and flip == "random":
                out[f"moments_{side}_flip"] = np.stack([r[f"moments_{side}_flip"]
                                                        for r in recs])
        if flip == "random":
            bits = flip_bits(self.seed, np.asarray(positions))
            for j, side in enumerate(("w", "l")):
                m = bits[:, j].reshape((-1,) + (1,) * (out[f"moments_{side}"].ndim - 1))
                out[f"moments_{side}"] = np.where(m, out.pop(f"moments_{side}_flip"),
                                                  out[f"moments_{side}"])
                out[f"flip_{side}"] = bits[:, j]
        return out

    def _dataset(self):
        import grain
        n, g, rows = self.num_examples, self.global_batch, self._rows()
        ds = grain.MapDataset.range(n)
        if self.shuffle:
            ds = ds.shuffle(seed=self.seed)
        ds = ds.repeat(None).batch(g)

        def load(b, idx):
            positions = b * g + np.arange(g)[rows]
            return self.read(np.asarray(idx)[rows], positions, self.flip)

        return ds.map_with_index(load)

    def _make_iter(self, step: int):
        import grain
        it = iter(self._dataset().to_iter_dataset(grain.ReadOptions(**self._read_options)))
        if step:
            it.set_state({"next_index": int(step)})
        return it

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iter is None:
            self._iter = self._make_iter(self._step)
        batch = next(self._iter)
        self._step += 1
        return batch

    @property
    def step(self) -> int:
        """Global batches consumed so far (the next batch is number `step`)."""
        return self._step

    # -- checkpointable position
    def get_state(self) -> dict:
        """The position, independent of the host count (JSON-able)."""
        return {"version": STATE_VERSION, "step": self._step, "seed": self.seed,
                "global_batch": self.global_batch, "num_examples": self.num_examples,
                "split": self.split, "shuffle": self.shuffle, "flip": self.flip}

    def set_state(self, state: dict) -> None:
        """Resume at `state` (from get_state, any host count); raises one line on mismatch."""
        mine = self.get_state()
        for key in ("seed", "global_batch", "num_examples", "split", "shuffle", "flip"):
            if key in state and state[key] != mine[key]:
                raise ValueError(f"loader state does not fit this loader: {key} was "
                                 f"{state[key]!r}, is {mine[key]!r} ({self.encode_dir}, split "
                                 f"{self.split!r})")
        step = int(state["step"])
        if step < 0:
            raise ValueError(f"loader state step must be >= 0, got {step}")
        self._step = step
        self._iter = None                 # rebuilt lazily at the new position

    # -- one ordered pass (validation)
    def epoch_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """One pass over the split in record order (no shuffle, no flips), this host's rows of
        each global batch, with `mask`; the last batch padded with record 0 (mask False)."""
        import grain
        n, g, rows = self.num_examples, self.global_batch, self._rows()

        def load(idx):
            idx = np.asarray(idx)
            full = np.zeros(g, np.int64)
            full[:idx.size] = idx
            mask = np.arange(g) < idx.size
            out = self.read(full[rows])
            out["mask"] = mask[rows]
            return out

        ds = grain.MapDataset.range(n).batch(g, drop_remainder=False).map(load)
        yield from ds.to_iter_dataset(grain.ReadOptions(**self._read_options))
