"""The trainer's configuration fields and the recipes the paper rows share.

Every config file under ``experiments/configs/`` builds on :func:`base_config`.
A field set to ``0`` or ``""`` means "derive it" (from the dataset, the
epochs or the devices), as noted beside it.
"""

from __future__ import annotations

import ml_collections

# adderjax.models.KINDS (tests/experiments/test_configs.py checks they agree), written out here so
# that loading a config does not import JAX: the command line answers some errors before that.
KINDS = ("adder", "conv", "binary")
PAPER = ("Chen et al., AdderNet: Do We Really Need Multiplications in Deep Learning?, "
         "CVPR 2020, https://arxiv.org/abs/1912.13200")
OFFICIAL_CODE = "https://github.com/huawei-noah/AdderNet (main.py, resnet20.py)"


def check_kind(kind: str) -> str:
  """Returns the network ``kind`` (empty means ``"adder"``) or raises a ValueError naming it.

  The kinds are those of the models, :data:`adderjax.models.KINDS`: the
  AdderNet, the CNN and the BNN that a paper row compares.
  """
  kind = kind or "adder"
  if kind not in KINDS:
    raise ValueError(f"The config argument (the network kind) must be one of {KINDS}, "
                     f"got {kind!r}.")
  return kind


def base_config() -> ml_collections.ConfigDict:
  """The default value of every field the trainer reads."""
  config = ml_collections.ConfigDict()
  config.reference = ""  # The recipe this config follows.

  # Model: a name of adderjax.models.names() and its keyword arguments.
  config.model = "lenet5_bn"
  config.kind = "adder"  # "adder", "conv" or "binary".
  config.grad_mode = "full_precision"  # "full_precision", "unclipped" or "sign".
  config.implementation = ""  # Adder kernels: "" picks the fastest for the backend.
  config.dtype = "float32"  # Compute dtype, "float32" or "bfloat16"; params stay float32.
  # The model's other keyword arguments, e.g. embed_dim for lenet_pp (a config file declares
  # them; the command line can then override them, --config.model_kwargs.embed_dim=3).
  config.model_kwargs = ml_collections.ConfigDict()
  # Weights to start a fresh run from (experiments/init_from.py): "" (random), "pretrained:NAME"
  # (adderjax.models.pretrained_names()) or a PyTorch AdderNet .pth read as config.model.
  config.init_from = ""

  # Data (adderjax.data).
  config.dataset = "mnist"  # "mnist", "cifar10", "cifar100" or "imagenet2012".
  # "tfds", "idx", "cifar_python", "bundled", "synthetic" or "digits".
  config.data_source = "tfds"
  # "" means the source's default: for "idx" and "cifar_python" the download cache
  # ($ADDERJAX_DATA_DIR, else ~/.cache/adderjax), for "tfds" ~/tensorflow_datasets.
  config.data_dir = ""
  # Fetch missing data: "idx" and "cifar_python" download the authors' files, checked
  # against their published MD5s (no TensorFlow); "tfds" lets TFDS prepare (needs TensorFlow).
  config.download = False
  config.train_split = ""  # "" means the dataset's training split.
  config.eval_split = ""  # "" means the dataset's test (or validation) split.
  config.num_synthetic_examples = 0  # Size of a synthetic training set; 0: the source's default.
  config.image_size = 0  # ImageNet crop size; 0: the dataset's model input size.
  config.augment = True  # The dataset's standard training augmentation.
  config.data_threads = 0  # Threads for per-image decoding and augmentation.

  # Optimization: addernet_sgd (SGD with momentum, weight decay, adaptive rate).
  config.batch_size = 256  # Global batch, over all devices and processes.
  config.eval_batch_size = 256
  config.num_epochs = 50.0
  config.num_train_steps = 0  # 0: num_epochs of the training set.
  config.learning_rate = 0.1
  config.schedule = "cosine"  # "cosine" or "constant".
  config.warmup_epochs = 0.0
  config.momentum = 0.9
  config.nesterov = False
  config.weight_decay = 5e-4
  config.label_smoothing = 0.0
  # The adder kernels' rate: "adaptive" (eta * sqrt(k) / ||g||, the paper),
  # "fixed" (the gradient times adder_lr_multiplier) or "none" (plain SGD).
  config.adder_lr = "adaptive"
  config.eta = 0.2
  config.adder_lr_multiplier = 1.0
  # The adder layers' exponent p, -sum |X - F|^p (experiments/adder_p.py): "" for the L1
  # AdderNet; "constant:P"; "linear:P0:P1:F" or "cosine:P0:P1:F", from P0 to P1 over the first
  # fraction F of the steps, e.g. "cosine:2:1:0.5". Logged as adder_p.
  config.adder_p_schedule = ""

  # Bookkeeping.
  config.seed = 0
  config.log_every_steps = 50
  config.eval_every_steps = 0  # 0: at the end of every epoch.
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 3
  config.bn_recompute_batches = 0  # Training batches to recompute BatchNorm stats on before eval.
  config.num_devices = 0  # Local devices to use; 0: all of them.
  config.on_nonfinite = "stop"  # A non-finite loss or state: "stop" the run, or "skip" the step.
  config.max_consecutive_skips = 10  # With "skip": stop after this many skipped steps in a row.
  # Multi-host: jax.distributed.initialize() from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  # JAX_PROCESS_ID, or the cluster JAX detects (experiments/distributed.py).
  config.distributed = False
  config.initialization_timeout_seconds = 300  # For every process to connect.
  config.heartbeat_timeout_seconds = 60  # A process silent this long ends the others.
  config.shutdown_timeout_seconds = 60  # At exit, for the other processes to finish.
  config.progress_bar = True
  return config


def mnist_lenet5_bn(kind: str) -> ml_collections.ConfigDict:
  """LeNet-5-BN on MNIST: the paper's Section 4.1 (cosine rate from 0.1, 50 epochs)."""
  config = base_config()
  config.reference = f"{PAPER}, Section 4.1 (MNIST) and Table 1."
  config.model = "lenet5_bn"
  config.kind = check_kind(kind)
  config.dataset = "mnist"
  config.data_source = "idx"  # The four IDX files, downloaded once into the cache.
  config.download = True
  config.batch_size = 256
  config.num_epochs = 50.0
  config.learning_rate = 0.1
  return config


def cifar(dataset: str, model: str, kind: str) -> ml_collections.ConfigDict:
  """A CIFAR row: the official code's recipe (SGD 0.9, wd 5e-4, batch 256, lr 0.05 cosine,
  400 epochs, eta 0.2)."""
  config = base_config()
  config.reference = (f"{PAPER}, Section 4.2 and Table 3; recipe of the official code, "
                      f"{OFFICIAL_CODE}.")
  config.model = model
  config.kind = check_kind(kind)
  config.dataset = dataset
  config.data_source = "cifar_python"  # The "python version" archive, downloaded once.
  config.download = True
  config.batch_size = 256
  config.num_epochs = 400.0
  config.learning_rate = 0.05
  config.weight_decay = 5e-4
  config.eta = 0.2
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  return config


def imagenet(model: str, kind: str) -> ml_collections.ConfigDict:
  """An ImageNet row: the paper's Section 4.3 (cosine rate, 150 epochs)."""
  config = base_config()
  config.reference = f"{PAPER}, Section 4.3 and Table 4."
  config.model = model
  config.kind = check_kind(kind)
  config.dataset = "imagenet2012"
  config.batch_size = 256
  config.num_epochs = 150.0
  config.learning_rate = 0.1
  config.weight_decay = 1e-4
  config.eta = 0.2
  config.data_threads = 16
  config.log_every_steps = 200
  config.checkpoint_every_steps = 2500
  return config
