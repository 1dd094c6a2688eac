"""vit_tiny on the bundled MNIST: adder attention (Shu et al., NeurIPS 2021) against dot products.

    python -m experiments.main --config=experiments/configs/mnist_vit_tiny.py:adder \\
        --workdir=/tmp/mnist_vit_tiny

The argument after the colon is the network: adder (default: adder attention
and adder MLPs), conv (dot-product attention, ordinary MLPs) or binary.
The data are the MNIST test images shipped in adderjax, the first 8,000 to
train on and the other 2,000 to test on, so that the run needs no network;
``--config.data_source=idx --config.download=True --config.train_split=
--config.eval_split=`` trains on the full MNIST instead.
"""

from experiments.configs import common


def get_config(kind: str = "adder"):
  config = common.mnist_lenet5_bn(kind)
  config.reference = ("Shu et al., Adder Attention for Vision Transformer, NeurIPS 2021; "
                      "a small ViT (Dosovitskiy et al., ICLR 2021) on MNIST, no paper row.")
  config.model = "vit_tiny"
  config.model_kwargs.embed_dim = 64
  config.model_kwargs.depth = 4
  config.model_kwargs.num_heads = 4
  config.model_kwargs.mlp_dim = 128
  config.model_kwargs.patch_size = 7
  config.data_source = "bundled"
  config.download = False
  config.train_split = "test[:8000]"
  config.eval_split = "test[8000:]"
  config.batch_size = 128
  config.num_epochs = 20.0
  config.learning_rate = 0.05
  config.warmup_epochs = 1.0
  return config
