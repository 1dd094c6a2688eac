"""Trained weights to start a run from: ``config.init_from``.

``config.init_from`` is one of

- ``""``: the model's own random initialisation;
- ``"pretrained:NAME"``: ``adderjax.models.pretrained(NAME)``, e.g.
  ``pretrained:resnet20_cifar10`` (the official AdderNet ResNet-20, shipped
  in the package);
- the path of a PyTorch AdderNet checkpoint (``.pth``), converted by
  ``adderjax.models.from_torch(config.model, path)`` without PyTorch.

Its parameters and BatchNorm statistics replace the model's before step 0 of a
fresh run (the optimizer starts afresh); a run that resumes from a checkpoint
restores that and does not read ``init_from``. The weights are AdderNet
weights, so ``config.kind`` must be ``"adder"``; a model or number of classes
that does not fit is a ValueError naming ``config.init_from``.
"""

from __future__ import annotations

import pathlib
from typing import Any

from flax import nnx
import jax
import ml_collections
import numpy as np

from adderjax import data, models

__all__ = ["PRETRAINED_PREFIX", "check", "copy_weights", "load"]

PRETRAINED_PREFIX = "pretrained:"

_WEIGHTS = nnx.Any(nnx.Param, nnx.BatchStat)
"""What ``init_from`` sets: the parameters (adder kernels included) and BatchNorm statistics."""


def _fail(config: ml_collections.ConfigDict, problem: str) -> ValueError:
  return ValueError(f"config.init_from={config.init_from!r} {problem}")


def check(config: ml_collections.ConfigDict) -> None:
  """Raises a ValueError naming ``config.init_from`` if it cannot fit the config's model.

  Reads no weights and no files: a ``.pth`` is checked when :func:`load` reads it.
  Assumes the other fields are valid (``experiments.train.check_config``).
  """
  value = config.init_from
  if not isinstance(value, str):
    raise _fail(config, "must be a string: '', 'pretrained:NAME' or the path of a .pth file.")
  if not value:
    return
  if config.kind != "adder":
    raise _fail(config, f"holds AdderNet weights, but config.kind={config.kind!r}; set "
                "config.kind='adder' or leave config.init_from empty.")
  if not value.startswith(PRETRAINED_PREFIX):
    if config.model not in models.TORCH_MODELS:
      raise _fail(config, f"is read as a PyTorch checkpoint, which initialises only the models "
                  f"{models.TORCH_MODELS}, but config.model={config.model!r}.")
    return
  name = value.removeprefix(PRETRAINED_PREFIX)
  if name not in models.pretrained_names():
    raise _fail(config, f"names no pretrained model; the names are {models.pretrained_names()}.")
  record = models.PRETRAINED[name]
  if record.model != config.model:
    raise _fail(config, f"is a {record.model}, but config.model={config.model!r}.")
  classes = data.DATASETS[record.dataset].num_classes
  wanted = data.DATASETS[config.dataset].num_classes
  if classes != wanted:
    raise _fail(config, f"has {classes} classes ({record.dataset}), but config.dataset="
                f"{config.dataset!r} has {wanted}.")


def load(config: ml_collections.ConfigDict) -> nnx.Module:
  """The model ``config.init_from`` names, with its weights (call only when it is set).

  Raises:
    ValueError: naming ``config.init_from``, if it names no pretrained model
      or no readable checkpoint of ``config.model``, or does not fit the config.
  """
  check(config)
  value = config.init_from
  if value.startswith(PRETRAINED_PREFIX):
    return models.pretrained(value.removeprefix(PRETRAINED_PREFIX))
  path = pathlib.Path(value).expanduser()
  if not path.is_file():
    raise _fail(config, f"is neither 'pretrained:NAME' (NAME one of "
                f"{models.pretrained_names()}) nor an existing PyTorch checkpoint file.")
  try:
    return models.from_torch(config.model, path,
                             num_classes=data.DATASETS[config.dataset].num_classes,
                             **config.model_kwargs.to_dict())
  except Exception as e:
    lines = str(e).strip().splitlines()
    raise _fail(config, f"could not be read as a {config.model} checkpoint: "
                f"{type(e).__name__}: {lines[0] if lines else ''}") from e


def _shapes(state: Any) -> dict[str, tuple[int, ...]]:
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  return {jax.tree_util.keystr(path).removesuffix(".value"): tuple(np.shape(leaf))
          for path, leaf in leaves}


def copy_weights(source: nnx.Module, target: nnx.Module, config: ml_collections.ConfigDict
                 ) -> None:
  """Sets ``target``'s parameters and BatchNorm statistics to ``source``'s.

  Raises:
    ValueError: naming ``config.init_from``, if the two models' weights differ
      in names or shapes (another architecture or width).
  """
  weights, expected = nnx.state(source, _WEIGHTS), nnx.state(target, _WEIGHTS)
  have, want = _shapes(weights), _shapes(expected)
  if have != want:
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    differ = sorted(k for k in set(have) & set(want) if have[k] != want[k])
    if differ:
      problem = f"{differ[0]} has shape {have[differ[0]]}, the model's {want[differ[0]]}"
    else:
      problem = f"{(missing or extra)[0]} is {'missing' if missing else 'not in the model'}"
    raise _fail(config, f"does not fit config.model={config.model!r} "
                f"(model_kwargs {config.model_kwargs.to_dict()}): {problem}.")
  nnx.update(target, jax.tree.map(lambda new, old: new.astype(old.dtype), weights, expected))
