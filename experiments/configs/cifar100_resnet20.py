"""ResNet-20 on CIFAR-100 (Table 3: BNN 54.14%, AdderNet 67.60%, CNN 68.14%).

    python -m experiments.main --config=experiments/configs/cifar100_resnet20.py:adder \\
        --workdir=/tmp/cifar100_resnet20

The argument after the colon is the network: adder (default), conv or binary.
"""

from experiments.configs import common


def get_config(kind: str = "adder"):
  return common.cifar("cifar100", "resnet20", kind)
