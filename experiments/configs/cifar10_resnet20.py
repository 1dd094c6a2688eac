"""ResNet-20 on CIFAR-10 (Table 3: BNN 84.87%, AdderNet 91.84%, CNN 92.25%).

    python -m experiments.main --config=experiments/configs/cifar10_resnet20.py:adder \\
        --workdir=/tmp/cifar10_resnet20

The argument after the colon is the network: adder (default), conv or binary.
"""

from experiments.configs import common


def get_config(kind: str = "adder"):
  return common.cifar("cifar10", "resnet20", kind)
