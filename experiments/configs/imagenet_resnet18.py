"""ResNet-18 on ImageNet (Table 4 top-1: BNN 51.2%, AdderNet 67.0%, CNN 69.8%).

    python -m experiments.main --config=experiments/configs/imagenet_resnet18.py:adder \\
        --workdir=/tmp/imagenet_resnet18

The argument after the colon is the network: adder (default), conv or binary.
"""

from experiments.configs import common


def get_config(kind: str = "adder"):
  return common.imagenet("resnet18", kind)
