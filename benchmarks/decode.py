"""Image decoding for the score stage: can the host feed the accelerator?

Pick-a-Pic-like input: `--images` JPEGs (quality 90, `--size` px square, smooth colour fields
with grain so they compress like photographs) stored as bytes in a parquet column, read
through image refs exactly as the score stage reads them. Timed:
  ours:      `input_pipeline.decoded_batches` with the score stage's decode function
             (parquet cell -> PIL decode -> RGB -> bicubic shortest-side resize -> centre crop,
             uint8 out; normalisation happens on the device), 1 thread and `--threads`.
  reference: transformers' PIL CLIP image processor (`CLIPImageProcessorPil`, or
             `CLIPImageProcessor` where that is the PIL one) on PIL images decoded from the same
             bytes, one call per batch, float32 normalised NCHW out, in this process (1 thread).
Prints images/s, the ratio to the reference, and how many decoding cores a given accelerator
rate needs (`--device-rate`, default 1123 images/s: our PickScore step on an H200,
benchmarks/RESULTS.md) at the measured per-core rate: a projection, not a measurement.

    python benchmarks/decode.py --out /tmp/decode.json
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import environment, print_table, write_json  # noqa: E402

import numpy as np  # noqa: E402


def make_jpegs(n: int, size: int, seed: int = 0) -> list[bytes]:
    from PIL import Image
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        f = rng.uniform(1, 6, (3, 2))
        ph = rng.uniform(0, 6.3, 3)
        img = np.stack([127 + 100 * np.sin(f[c, 0] * 6.3 * xx + f[c, 1] * 6.3 * yy + ph[c])
                        for c in range(3)], axis=-1)
        img += rng.normal(0, 12, img.shape)
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def reference_processor():
    import transformers
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls(), cls.__name__


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--device-rate", type=float, default=1123.0)
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from fifa_jax.data import images
    from fifa_jax.scoring import input_pipeline
    from fifa_jax.scoring import preprocess as pp
    from fifa_jax.scoring.margins import _decode_fn

    env = environment()
    print("environment:", env)
    jpegs = make_jpegs(args.images, args.size)
    cfg = pp.ImageProcessorConfig()
    h, w = cfg.out_hw
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "shard.parquet")
        pq.write_table(pa.table({"jpg_0": pa.array(jpegs, pa.binary())}), path,
                       row_group_size=args.batch)
        refs = [images.make_ref(path, i, "jpg_0") for i in range(args.images)]
        specs = [(refs[i:i + args.batch], i) for i in range(0, args.images, args.batch)]

        def ours(threads: int) -> float:
            images.clear_cache()
            t = time.perf_counter()
            n = sum(int(b.ok.sum()) for b in input_pipeline.decoded_batches(
                specs, _decode_fn(cfg), (h, w, 3), num_workers=threads))
            assert n == args.images
            return time.perf_counter() - t

        ours(args.threads)                                      # warm the page cache
        for threads in sorted({1, args.threads}):
            s = ours(threads)
            rows.append({"method": f"ours: decoded_batches, {threads} thread(s)",
                         "threads": threads, "seconds": s, "images_per_s": args.images / s})

        proc, name = reference_processor()

        def reference() -> float:
            t = time.perf_counter()
            for i in range(0, args.images, args.batch):
                ims = []
                for data in jpegs[i:i + args.batch]:
                    with Image.open(io.BytesIO(data)) as im:
                        im.load()
                        ims.append(im.convert("RGB"))
                proc(images=ims, return_tensors="np")
            return time.perf_counter() - t

        s = reference()
        rows.append({"method": f"reference: transformers {name}, 1 thread", "threads": 1,
                     "seconds": s, "images_per_s": args.images / s})
    ref = rows[-1]["images_per_s"]
    for r in rows:
        r["vs_reference"] = r["images_per_s"] / ref
    one = rows[0]["images_per_s"]
    print(f"\ndecode + resize + crop of {args.images} JPEGs {args.size}x{args.size} -> {h}x{w}; "
          f"{env['cpu_count']} cores")
    print_table(rows, [("method", "method"), ("seconds", "s"), ("images_per_s", "images/s"),
                       ("vs_reference", "vs reference")])
    need = args.device_rate / one
    print(f"\nprojection: {args.device_rate:.0f} images/s on the accelerator needs about "
          f"{need:.1f} decoding cores at {one:.0f} images/s per core")
    write_json(args.out, {"benchmark": "decode", "images": args.images, "size": args.size,
                          "environment": env, "results": rows,
                          "projection": {"device_rate": args.device_rate,
                                         "cores_needed": need}})


if __name__ == "__main__":
    main()
