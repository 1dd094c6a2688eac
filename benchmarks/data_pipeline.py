"""Throughput of the input pipeline (`adderjax.data`) in images/s, without any model.

Cases (each timed by pulling batches from `train_batches` / `eval_batches`
back to back, after a warm-up, for several rounds; the median round is
reported):

- ``cifar10``: a synthetic in-memory source of 50,000 32x32x3 images
  (`load_source(..., source="synthetic")`), global batch 256; training with
  pad-crop-flip and evaluation.
- ``mnist``: a synthetic in-memory source of 60,000 28x28x1 images,
  global batch 256; training and evaluation (normalisation only).
- ``imagenet``: decoded 375x500x3 images (ImageNet's typical size; a pool
  of distinct random images behind a source without ``.images``, read one
  at a time as TFDS sources are), training with random resized crop and
  flip to 224 and evaluation with resize and centre crop, with
  ``num_threads`` 0 and 2, resized in numpy and, if it is installed, with
  Pillow (`adderjax.data.resize`).
- ``imagenet jpeg``: the same images JPEG-encoded (quality 90) and decoded
  by the source with Pillow, as real ImageNet needs, then resized with
  Pillow; only if Pillow is installed.

    python benchmarks/data_pipeline.py
    python benchmarks/data_pipeline.py --rounds 5 --json benchmarks/results/cpu_2core_data.json
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
import contextlib
import io
import statistics
import time
from unittest import mock

import numpy as np
from report import machine_meta, write_json  # benchmarks/report.py

from adderjax import data
from adderjax.data import resize

IMAGENET_SHAPE = (375, 500, 3)


class DecodedPool:
  """``num_examples`` examples cycling through a pool of decoded images."""

  def __init__(self, images: np.ndarray, num_examples: int):
    self._images, self._num_examples = images, num_examples

  def __len__(self) -> int:
    return self._num_examples

  def __getitem__(self, index: int) -> dict:
    return {"image": self._images[index % len(self._images)], "label": index % 1000}


class JpegPool:
  """Like :class:`DecodedPool`, but each read decodes a JPEG with Pillow."""

  def __init__(self, images: np.ndarray, num_examples: int):
    from PIL import Image
    self._image_module = Image
    self._jpegs = []
    for image in images:
      buffer = io.BytesIO()
      Image.fromarray(image).save(buffer, format="JPEG", quality=90)
      self._jpegs.append(buffer.getvalue())
    self._num_examples = num_examples

  def __len__(self) -> int:
    return self._num_examples

  def __getitem__(self, index: int) -> dict:
    jpeg = self._jpegs[index % len(self._jpegs)]
    with self._image_module.open(io.BytesIO(jpeg)) as image:
      pixels = np.asarray(image.convert("RGB"))
    return {"image": pixels, "label": index % 1000}


def smooth_images(count: int, shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
  """Random images with some spatial structure (pure noise would make JPEG unusually slow)."""
  rng = np.random.default_rng(seed)
  height, width, channels = shape
  coarse = rng.uniform(0, 255, (count, height // 25 + 1, width // 25 + 1, channels))
  images = coarse.repeat(25, 1).repeat(25, 2)[:, :height, :width]
  images += rng.normal(0, 20, images.shape)
  return np.clip(images, 0, 255).astype(np.uint8)


def time_batches(make_iterator: Callable[[], Iterator[dict]], *, batch_size: int, rounds: int,
                 batches_per_round: int, warmup: int) -> dict:
  """Median images/s over ``rounds`` of ``batches_per_round`` batches, after ``warmup`` batches."""
  iterator = make_iterator()
  for _ in range(warmup):
    next(iterator)
  seconds = []
  for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(batches_per_round):
      batch = next(iterator)
    seconds.append(time.perf_counter() - start)
  assert np.isfinite(batch["image"]).all()
  median = statistics.median(seconds)
  return {"images_per_s": batch_size * batches_per_round / median,
          "ms_per_batch": median / batches_per_round * 1e3,
          "rounds_images_per_s": [batch_size * batches_per_round / s for s in seconds]}


def resize_backend(name: str):
  """A context in which the pipeline resizes with ``name``: "numpy" hides Pillow from it."""
  if name == "numpy":
    return mock.patch.object(resize, "_pil_image", lambda: None)
  return contextlib.nullcontext()


def run_case(case: str, dataset: str, source, *, mode: str, batch_size: int, threads: int,
             args: argparse.Namespace, batches_per_round: int, **kwargs) -> dict:
  common = dict(global_batch_size=batch_size, process_index=0, process_count=1,
                num_threads=threads, **kwargs)
  if mode == "train":
    make = lambda: data.train_batches(dataset, source, seed=0, **common)
  else:
    # Evaluation ends: restart it when a round needs more batches than it has.
    def make():
      while True:
        yield from data.eval_batches(dataset, source, **common)
  result = time_batches(make, batch_size=batch_size, rounds=args.rounds,
                        batches_per_round=batches_per_round, warmup=args.warmup)
  backend = resize.default_backend() if dataset == "imagenet2012" else "-"
  row = {"case": case, "mode": mode, "dataset": dataset, "global_batch": batch_size,
         "num_threads": threads, "resize": backend, **result}
  print(f"# {case} {mode} threads={threads} resize={backend}: "
        f"{row['images_per_s']:.0f} images/s", flush=True)
  return row


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=2, help="batches before timing")
  parser.add_argument("--batch", type=int, default=256, help="global batch (CIFAR, MNIST)")
  parser.add_argument("--imagenet-batch", type=int, default=64, help="global batch (ImageNet)")
  parser.add_argument("--imagenet-pool", type=int, default=64,
                      help="distinct ImageNet-sized images in the synthetic source")
  parser.add_argument("--cases", nargs="+", default=["cifar10", "mnist", "imagenet", "jpeg"],
                      choices=["cifar10", "mnist", "imagenet", "jpeg"])
  parser.add_argument("--json", help="also write the results to this file")
  args = parser.parse_args()
  rows = []
  small = dict(batch_size=args.batch, threads=0, args=args, batches_per_round=20)
  if "cifar10" in args.cases:
    source = data.load_source("cifar10", "train", source="synthetic", num_examples=50_000)
    for mode in ("train", "eval"):
      rows.append(run_case("cifar10 synthetic 50000x32x32x3", "cifar10", source, mode=mode,
                           **small))
  if "mnist" in args.cases:
    source = data.load_source("mnist", "train", source="synthetic", num_examples=60_000)
    for mode in ("train", "eval"):
      rows.append(run_case("mnist synthetic 60000x28x28x1", "mnist", source, mode=mode, **small))
  has_pil = resize.default_backend() == "pil"
  if not has_pil:
    print("# Pillow is not installed (pip install pillow): ImageNet resizes in numpy only, "
          "and the JPEG case is skipped")
  runs = []  # (case, source class, resize backend)
  if "imagenet" in args.cases:
    runs += [("imagenet decoded 375x500x3 -> 224", DecodedPool, "numpy")]
    runs += [("imagenet decoded 375x500x3 -> 224", DecodedPool, "pil")] if has_pil else []
  if "jpeg" in args.cases and has_pil:
    runs += [("imagenet jpeg 375x500x3 -> 224", JpegPool, "pil")]
  images = smooth_images(args.imagenet_pool, IMAGENET_SHAPE) if runs else None
  for case, pool, backend in runs:
    source = pool(images, 100_000)
    for mode in ("train", "eval"):
      for threads in (0, 2):
        with resize_backend(backend):
          rows.append(run_case(case, "imagenet2012", source, mode=mode,
                               batch_size=args.imagenet_batch, threads=threads, args=args,
                               batches_per_round=2, image_size=224))
  meta = machine_meta()
  print(f"\n{meta}\n")
  print("| case | mode | global batch | threads | resize | images/s | ms/batch |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['case']} | {r['mode']} | {r['global_batch']} | {r['num_threads']} | "
          f"{r['resize']} | {r['images_per_s']:.0f} | {r['ms_per_batch']:.1f} |")
  write_json(args.json, meta, rows)


if __name__ == "__main__":
  main()
