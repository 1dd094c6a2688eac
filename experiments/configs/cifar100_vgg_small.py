"""VGG-small on CIFAR-100 (Table 3: BNN 65.41%, AdderNet 72.64%, CNN 72.73%).

    python -m experiments.main --config=experiments/configs/cifar100_vgg_small.py:adder \\
        --workdir=/tmp/cifar100_vgg_small

The argument after the colon is the network: adder (default), conv or binary.
"""

from experiments.configs import common


def get_config(kind: str = "adder"):
  return common.cifar("cifar100", "vgg_small", kind)
