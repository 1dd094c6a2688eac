"""Ablations of the paper's Table 5 on MNIST LeNet-5-BN, and of the input-gradient clip.

The argument after the colon is ``GRAD_MODE,ADDER_LR``:

- ``GRAD_MODE``: ``full_precision`` (the paper: full-precision weight gradient,
  HardTanh-clipped input gradient), ``sign`` (the exact gradient, signSGD-like)
  or ``unclipped`` (full-precision gradients without the HardTanh clip);
- ``ADDER_LR``: ``adaptive`` (eta * sqrt(k) / ||g||_2, the paper's ALR),
  ``fixed`` (a fixed increased rate, the paper's ILR: the adder kernels'
  gradients times ``adder_lr_multiplier``) or ``none`` (the global rate only).

    python -m experiments.main --config=experiments/configs/ablation_lenet5_bn.py:sign,fixed \\
        --workdir=/tmp/ablation_sign_fixed

The paper does not give ILR's factor. ``FIXED_MULTIPLIER`` is the median of
the adaptive factors (``adaptive_lr_scale/*`` in metrics.jsonl) that the
full-precision adaptive LeNet-5-BN run of experiments/README.md logged over its
first epoch: 640 (per layer from 85 for conv1 to 3,730 for fc1). The fixed
rate thus starts near where the adaptive one does, the same for every layer,
and then stays put.
"""

from experiments.configs import common

GRAD_MODES = ("full_precision", "sign", "unclipped")
ADDER_LRS = ("adaptive", "fixed", "none")
FIXED_MULTIPLIER = 640.0


def get_config(arg: str = "full_precision,adaptive"):
  parts = [p.strip() for p in (arg or "full_precision,adaptive").split(",")]
  if len(parts) != 2 or parts[0] not in GRAD_MODES or parts[1] not in ADDER_LRS:
    raise ValueError(
        f"The config argument must be GRAD_MODE,ADDER_LR with GRAD_MODE in {GRAD_MODES} "
        f"and ADDER_LR in {ADDER_LRS}, got {arg!r}.")
  config = common.mnist_lenet5_bn("adder")
  config.reference += " Ablation: Section 4.4 and Table 5."
  config.grad_mode, config.adder_lr = parts
  config.adder_lr_multiplier = FIXED_MULTIPLIER
  return config
