"""ResNet-50 on ImageNet (Table 4 top-1: AdderNet 74.9%).

    python -m experiments.main --config=experiments/configs/imagenet_resnet50.py:adder \\
        --workdir=/tmp/imagenet_resnet50

The argument after the colon is the network: adder (default), conv or binary.
"""

from experiments.configs import common


def get_config(kind: str = "adder"):
  return common.imagenet("resnet50", kind)
