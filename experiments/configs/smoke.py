"""A tiny run for tests and a first try: LeNet-5-BN on synthetic MNIST-like data.

    python -m experiments.main --config=experiments/configs/smoke.py --workdir=/tmp/smoke

Twenty steps of batch 32 on a learnable synthetic task, evaluated and
checkpointed twice, with BatchNorm statistics recomputed
before each evaluation; about 20 s on a 2-core CPU.
"""

from experiments.configs import common


def get_config(kind: str = "adder"):
  config = common.base_config()
  config.reference = "Smoke test; no paper recipe."
  config.kind = common.check_kind(kind)
  config.model = "lenet5_bn"
  config.dataset = "mnist"
  config.data_source = "synthetic"
  config.num_synthetic_examples = 320
  config.batch_size = 32
  config.eval_batch_size = 64
  config.num_train_steps = 20
  config.learning_rate = 0.05
  config.log_every_steps = 5
  config.eval_every_steps = 10
  config.checkpoint_every_steps = 10
  # Twenty steps leave BatchNorm's running averages far behind (momentum 0.9).
  config.bn_recompute_batches = 2
  return config
