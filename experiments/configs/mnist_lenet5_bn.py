"""LeNet-5-BN on MNIST (Table 1: CNN 99.4%, AdderNet 99.4%).

    python -m experiments.main --config=experiments/configs/mnist_lenet5_bn.py:adder \\
        --workdir=/tmp/mnist_lenet5_bn

The argument after the colon is the network: adder (default), conv or binary.
"""

from experiments.configs import common


def get_config(kind: str = "adder"):
  return common.mnist_lenet5_bn(kind)
