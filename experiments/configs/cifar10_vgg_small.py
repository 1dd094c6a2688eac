"""VGG-small on CIFAR-10 (Table 3: BNN 89.80%, AdderNet 93.72%, CNN 93.80%).

    python -m experiments.main --config=experiments/configs/cifar10_vgg_small.py:adder \\
        --workdir=/tmp/cifar10_vgg_small

The argument after the colon is the network: adder (default), conv or binary.
"""

from experiments.configs import common


def get_config(kind: str = "adder"):
  return common.cifar("cifar10", "vgg_small", kind)
