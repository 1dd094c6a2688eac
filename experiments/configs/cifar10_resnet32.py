"""ResNet-32 on CIFAR-10 (Table 3).

    python -m experiments.main --config=experiments/configs/cifar10_resnet32.py:adder \\
        --workdir=/tmp/cifar10_resnet32

The argument after the colon is the network: adder (default), conv or binary.
"""

from experiments.configs import common


def get_config(kind: str = "adder"):
  return common.cifar("cifar10", "resnet32", kind)
