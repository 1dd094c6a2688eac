"""Records the official AdderNet code's outputs as small .npz fixtures for the tests.

Run once, by hand, with PyTorch installed (the tests themselves never import it)::

  mkdir -p /tmp/official
  git -C <AdderNet clone> archive d94dc43 | tar -x -C /tmp/official
  python tests/models/official/record_official_logits.py --official-repo /tmp/official

``--official-repo`` is a directory holding huawei-noah/AdderNet at commit
d94dc43 (``adder.py``, ``resnet20.py``, ``resnet50.py`` and
``models/ResNet20-AdderNet.pth``); its files are executed here, and not kept
in this repository. Written next to this script:

- ``resnet20_official.npz``: the official ResNet-20 with the official
  CIFAR-10 checkpoint, in eval mode, on 32 `generators.cifar_images`
  normalised as the official ``test.py`` does: its logits in float32 (the
  official code's dtype) and in float64 (the model and the same inputs cast);
  and the checkpoint's keys and a digest of its tensors as ``torch.load``
  reads them.
- ``resnet50_official.npz``: the official ResNet-50 (10 classes) with the
  weights of `generators.resnet50_state_dict` and BatchNorm running
  statistics measured on `generators.resnet50_calibration_images` (stored
  here as float16 means and standard deviations), in eval mode, on
  `generators.resnet50_test_images`: its logits in float32 and float64.
- ``varied.pth`` (zip format) and ``varied_legacy.pth`` (the pre-1.6 format),
  written by ``torch.save``, with ``varied_expected.npz``, the values and
  dtypes ``torch.load`` reads back: tensors of many dtypes, views with
  offsets and strides, storages shared between tensors, a parameter, under
  ``"state_dict"`` with a ``"module."`` prefix.
"""

from __future__ import annotations

import argparse
import collections
import copy
import importlib
import pathlib
import sys
import types

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
if __package__:  # imported (pytest collects doctests)
  from . import generators
else:  # run as a script
  sys.path.insert(0, str(HERE))
  import generators


def _official_modules(repo: pathlib.Path) -> tuple[types.ModuleType, types.ModuleType]:
  """The official ``resnet20`` and ``resnet50`` modules.

  ``resnet50.py`` at d94dc43 begins with ``1mport torch.nn as nn``, a typo
  that makes it a syntax error; it is read with that one word corrected.
  """
  sys.path.insert(0, str(repo))
  resnet20 = importlib.import_module("resnet20")
  source = (repo / "resnet50.py").read_text()
  if not source.lstrip().startswith("#") or "1mport torch.nn as nn" not in source:
    raise SystemExit(f"{repo / 'resnet50.py'} is not the file of commit d94dc43")
  resnet50 = types.ModuleType("resnet50")
  resnet50.__file__ = str(repo / "resnet50.py")
  exec(compile(source.replace("1mport torch.nn as nn", "import torch.nn as nn"),
               resnet50.__file__, "exec"), resnet50.__dict__)
  return resnet20, resnet50


def _nchw(images_nhwc: np.ndarray):
  import torch
  return torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))


def _logits(model, x) -> tuple[np.ndarray, np.ndarray]:
  """The model's eval-mode logits in float32 and in float64."""
  import torch
  model.eval()
  with torch.no_grad():
    logits32 = model.float()(x.float()).numpy()
    logits64 = copy.deepcopy(model).double()(x.double()).numpy()
  return logits32, logits64


def record_resnet20(resnet20: types.ModuleType, repo: pathlib.Path) -> None:
  import torch
  model = resnet20.resnet20()
  state = torch.load(repo / "models" / "ResNet20-AdderNet.pth", map_location="cpu")
  model.load_state_dict({key.removeprefix("module."): value for key, value in state.items()})
  images = generators.cifar_images(generators.RESNET20_SEED, 32)
  x = generators.cifar_normalize(images)
  logits32, logits64 = _logits(model, _nchw(x))
  np.savez_compressed(HERE / "resnet20_official.npz", logits_float32=logits32,
                      logits_float64=logits64, inputs_sha256=generators.digest(x),
                      checkpoint_keys=np.array(list(state)),
                      checkpoint_sha256=generators.digest(*(v.numpy() for v in state.values())))
  print(f"resnet20: logits std {logits32.std():.3f}, predictions {logits32.argmax(1).tolist()}, "
        f"float32 vs float64 max abs {np.abs(logits32 - logits64).max():.2e}")


def record_resnet50(resnet50: types.ModuleType) -> None:
  import torch
  state = generators.resnet50_state_dict()
  model = resnet50.resnet50(num_classes=generators.RESNET50_NUM_CLASSES).double()
  result = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()},
                                 strict=False)
  shapes = generators.resnet50_shapes()
  if result.unexpected_keys or any(
      not key.endswith(("running_mean", "running_var", "num_batches_tracked"))
      for key in result.missing_keys) or set(model.state_dict()) - {
          *shapes, *(k for k in model.state_dict() if k.endswith("num_batches_tracked"))}:
    raise SystemExit(f"the generated state dict does not fit resnet50.py: {result}")
  for key, value in model.state_dict().items():
    if key in shapes and tuple(value.shape) != shapes[key]:
      raise SystemExit(f"{key}: shape {tuple(value.shape)}, generated {shapes[key]}")

  # The running statistics: one float64 batch in training mode, with a cumulative average.
  norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  for norm in norms:
    norm.reset_running_stats()
    norm.momentum = None
  model.train()
  with torch.no_grad():
    model(_nchw(generators.resnet50_calibration_images()).double())
  calibrated = model.state_dict()
  prefixes = [prefix for prefix, _ in generators.resnet50_batch_norms()]
  running_mean = np.concatenate([calibrated[f"{p}.running_mean"].numpy() for p in prefixes])
  running_var = np.concatenate([calibrated[f"{p}.running_var"].numpy() for p in prefixes])
  running_mean, running_std = running_mean.astype(np.float16), np.sqrt(running_var).astype(
      np.float16)
  if not (np.isfinite(running_mean).all() and np.isfinite(running_std).all()
          and (running_std > 0).all()):
    raise SystemExit("the running statistics do not fit float16")
  full = generators.resnet50_with_statistics(state, running_mean, running_std)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in full.items()}, strict=False)

  x = generators.resnet50_test_images()
  logits32, logits64 = _logits(model, _nchw(x))
  np.savez_compressed(HERE / "resnet50_official.npz", logits_float32=logits32,
                      logits_float64=logits64, running_mean=running_mean,
                      running_std=running_std, inputs_sha256=generators.digest(x),
                      weights_sha256=generators.digest(*state.values()))
  print(f"resnet50: logits {np.round(logits64, 3).tolist()}, "
        f"float32 vs float64 max abs {np.abs(logits32 - logits64).max():.2e}")


def record_varied() -> None:
  import torch
  generator = torch.Generator().manual_seed(0)
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 4
  shared = torch.arange(10, dtype=torch.float64) * 0.5
  state = torch.nn.BatchNorm2d(2).state_dict()  # an OrderedDict with _metadata
  tensors = {
      "float32": base,
      "float32_transposed": base.t(),  # the same storage, strides (1, 6)
      "float32_strided": base[1:, ::2],  # an offset and a step
      "float64_head": shared[:4],
      "float64_tail": shared[6:].view(2, 2),  # the same storage as float64_head, offset 6
      "float16": torch.tensor([0.5, -1.25, 65504.0, 6e-5], dtype=torch.float16),
      "bfloat16": torch.tensor([[1.5, -2.25], [3.0e38, 1e-3]], dtype=torch.bfloat16),
      "int64": torch.tensor([-(2 ** 40), 0, 7], dtype=torch.int64),
      "int32": torch.tensor([[-3, 2 ** 30]], dtype=torch.int32),
      "int16": torch.tensor([-300, 300], dtype=torch.int16),
      "int8": torch.tensor([-128, 127], dtype=torch.int8),
      "uint8": torch.tensor([0, 255], dtype=torch.uint8),
      "bool": torch.tensor([[True, False, True]]),
      "scalar": torch.tensor(3.25),
      "empty": torch.zeros(0, 3),
      "parameter": torch.nn.Parameter(torch.randn(2, 3, generator=generator)),
  }
  state.update(tensors)
  wrapped = collections.OrderedDict((f"module.{key}", value) for key, value in state.items())
  wrapped._metadata = state._metadata
  checkpoint = {"epoch": 3, "best_acc1": 91.5, "state_dict": wrapped}
  torch.save(checkpoint, HERE / "varied.pth")
  torch.save(checkpoint, HERE / "varied_legacy.pth", _use_new_zipfile_serialization=False)

  loaded = torch.load(HERE / "varied.pth", weights_only=True)["state_dict"]
  expected = {}
  for key, value in loaded.items():
    key = key.removeprefix("module.")
    value = value.detach()
    expected[key] = (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    expected[f"{key}:dtype"] = np.array(str(value.dtype).removeprefix("torch."))
  np.savez_compressed(HERE / "varied_expected.npz", **expected)
  print(f"varied: {len(loaded)} tensors")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--official-repo", type=pathlib.Path, required=True,
                      help="huawei-noah/AdderNet at commit d94dc43, extracted")
  args = parser.parse_args()
  import torch
  torch.set_num_threads(2)
  resnet20, resnet50 = _official_modules(args.official_repo.resolve())
  record_resnet20(resnet20, args.official_repo.resolve())
  record_resnet50(resnet50)
  record_varied()


if __name__ == "__main__":
  main()
