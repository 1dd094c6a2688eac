"""The trainer end to end: smoke run on mock TFDS data, resume, devices, failures."""

import json
import pathlib
import signal
import subprocess
import sys
import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from adderjax import data
from adderjax.ops import cpu_native, native_build
from experiments import train
from experiments.checkpoints import Checkpoints
from experiments.configs import smoke
from experiments.metrics import read_metrics

REPO = pathlib.Path(__file__).parents[2]


def smoke_config(**overrides):
  config = smoke.get_config()
  config.progress_bar = False
  config.bn_recompute_batches = 0  # One compilation less; tested with mock TFDS data.
  config.update(overrides)
  return config


def final_params(workdir):
  """The parameters of the newest checkpoint in ``workdir``, as numpy, by path."""
  checkpoints = Checkpoints(pathlib.Path(workdir) / "checkpoints")
  step = checkpoints.latest_step()
  like = train.Trainer(smoke_config(), train.make_mesh(0), 1, 1).state
  state = checkpoints.restore(step, like)
  checkpoints.close()
  return step, {k: np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def assert_same_params(a, b, **tolerance):
  assert a.keys() == b.keys()
  for key in a:
    if tolerance:
      np.testing.assert_allclose(a[key], b[key], err_msg=str(key), **tolerance)
    else:
      np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """The smoke config run from start to end: (workdir, result)."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  return workdir, train.train_and_evaluate(smoke_config(), workdir)


def test_smoke_run_on_mock_tfds_learns_checkpoints_and_evaluates(tmp_path):
  config = smoke_config(data_source="tfds", num_train_steps=30, bn_recompute_batches=2)
  with tfds.testing.mock_data(num_examples=192, policy=tfds.testing.MockPolicy.USE_CODE):
    result = train.train_and_evaluate(config, tmp_path)
  records = read_metrics(tmp_path / "metrics.jsonl")
  losses = [r["train_loss"] for r in records if "train_loss" in r]
  # Random mock images with random labels: memorized slowly, but memorized.
  assert len(losses) == 6 and np.mean(losses[-2:]) < losses[0] - 0.05, losses
  assert result["step"] == 30
  # Every one of the 192 mock test examples is counted once (3 batches of 64).
  assert result["eval_examples"] == 192
  assert 0.0 <= result["eval_accuracy"] <= 1.0 and np.isfinite(result["eval_loss"])
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) \
      == [10, 20, 30]
  last_train = [r for r in records if "train_loss" in r][-1]
  scales = [k for k in last_train if k.startswith("adaptive_lr_scale/")]
  assert scales and all(last_train[k] > 0 for k in scales)
  first = records[0]
  # Logged at step 5: the rate of the fifth update, cosine from 0.05 over 30 steps.
  assert first["learning_rate"] == pytest.approx(0.025 * (1 + np.cos(np.pi * 4 / 30)))
  assert first["images_per_sec"] > 0
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert json.loads((tmp_path / "config.json").read_text())["data_source"] == "tfds"


def test_adaptive_scale_is_logged_for_each_adder_kernel(uninterrupted):
  workdir, _ = uninterrupted
  last = [r for r in read_metrics(workdir / "metrics.jsonl") if "train_loss" in r][-1]
  scales = {k for k in last if k.startswith("adaptive_lr_scale/")}
  # LeNet-5-BN as an AdderNet: every layer is an adder layer (each followed by BatchNorm).
  assert scales == {f"adaptive_lr_scale/{name}/kernel"
                    for name in ("conv1", "conv2", "fc1", "fc2", "fc3")}


class Interrupt(Exception):
  pass


def interrupt_at(monkeypatch, step):
  """Makes the trainer raise when it fetches the batch of training step ``step`` (from 1)."""
  train_batches = data.train_batches

  def failing(*args, seed, start_step=0, **kwargs):
    batches = train_batches(*args, seed=seed, start_step=start_step, **kwargs)
    if seed != smoke_config().seed:  # The batches BatchNorm statistics are recomputed on.
      yield from batches
      return
    for index, batch in enumerate(batches, start_step + 1):
      if index == step:
        raise Interrupt(f"interrupted before step {step}")
      yield batch

  monkeypatch.setattr(data, "train_batches", failing)


def test_interrupted_and_resumed_run_ends_with_the_same_parameters(
    uninterrupted, tmp_path, monkeypatch):
  with monkeypatch.context() as patch:
    interrupt_at(patch, 15)
    with pytest.raises(Interrupt):
      train.train_and_evaluate(smoke_config(), tmp_path)
  steps = Checkpoints(tmp_path / "checkpoints").all_steps()
  assert sorted(steps) == [10, 14]  # The interrupt saved the 14 steps done.
  lines_before = (tmp_path / "metrics.jsonl").read_text()
  result = train.train_and_evaluate(smoke_config(), tmp_path)
  assert result["step"] == 20
  assert (tmp_path / "metrics.jsonl").read_text().startswith(lines_before)
  assert_same_params(final_params(tmp_path)[1], final_params(uninterrupted[0])[1])


def test_a_record_torn_by_a_crash_does_not_spoil_the_resumed_metrics(uninterrupted, tmp_path):
  """The old writer appended the resumed run's first record to the half line."""
  import shutil
  import warnings
  workdir = tmp_path / "workdir"
  shutil.copytree(uninterrupted[0], workdir)
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write('{"step": 99, "tra')
  train.train_and_evaluate(smoke_config(num_train_steps=25), workdir)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    records = read_metrics(workdir / "metrics.jsonl")
  assert records[-1]["step"] == 25 and 99 not in [r["step"] for r in records]


def test_killed_process_resumes_to_the_same_parameters(uninterrupted, tmp_path):
  """SIGKILL leaves no time to save: the run goes back to its last periodic checkpoint."""
  command = [sys.executable, "-m", "experiments.main",
             f"--config={REPO / 'experiments/configs/smoke.py'}", f"--workdir={tmp_path}",
             "--config.progress_bar=False", "--config.bn_recompute_batches=0",
             "--config.checkpoint_every_steps=4"]
  process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
  deadline = time.time() + 240
  while not (tmp_path / "checkpoints" / "8").exists():
    assert process.poll() is None, process.stderr.read().decode()[-3000:]
    assert time.time() < deadline, "no checkpoint within 240 s"
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert completed.returncode == 0, completed.stderr[-3000:]
  assert "Resumed from the checkpoint of step" in completed.stderr
  step, params = final_params(tmp_path)
  assert step == 20
  assert_same_params(params, final_params(uninterrupted[0])[1])


def test_eight_devices_give_the_parameters_of_one(tmp_path):
  assert jax.device_count() == 8
  config = smoke_config(num_train_steps=6, eval_every_steps=6, checkpoint_every_steps=6)
  train.train_and_evaluate(config, tmp_path / "eight")
  config.num_devices = 1
  train.train_and_evaluate(config, tmp_path / "one")
  # The model's parameters and batch statistics (the optimizer state is the first item's
  # sibling); sums run in another order, and adder outputs are large.
  eight, one = (
      {k: v for k, v in final_params(tmp_path / name)[1].items() if k[0].key == 0}
      for name in ("eight", "one"))
  assert len(eight) == 25  # 5 kernels; scale, bias, mean and var of 5 BatchNorms.
  assert_same_params(eight, one, rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(not cpu_native.available(), reason="native kernels unavailable")
def test_the_fused_ops_run_on_one_device_only():
  """Over several devices a custom call would run the whole batch on each: the layers run
  unfused there (the adder kernels per shard), fused on one device."""
  config = smoke_config()
  fused_targets = (native_build.FORWARD_STATS_TARGET, native_build.BATCH_NORM_TARGET)
  for devices, fused in ((1, True), (8, False)):
    trainer = train.Trainer(config, train.make_mesh(devices), 1, 1)
    batch = {"image": jax.device_put(jnp.zeros((config.batch_size, 28, 28, 1)),
                                     trainer.batch_sharding),
             "label": jax.device_put(jnp.zeros((config.batch_size,), jnp.int32),
                                     trainer.batch_sharding)}
    text = trainer.train_step.lower(trainer.state, batch).as_text()
    assert all((f"@{t}(" in text) == fused for t in fused_targets), devices


def test_bfloat16_compute_trains(tmp_path, monkeypatch):
  """With an adder_p_schedule too (one run for both): cosine:2:1:0.5 over 4 steps gives
  p = 2, 1.5, then 1, set inside the jitted step, which compiles once, and logged."""
  traces = []
  step = train.Trainer._train_step

  def counted(self, state, batch):
    traces.append(1)
    return step(self, state, batch)

  monkeypatch.setattr(train.Trainer, "_train_step", counted)
  config = smoke_config(dtype="bfloat16", num_train_steps=4, log_every_steps=2,
                        adder_p_schedule="cosine:2:1:0.5")
  result = train.train_and_evaluate(config, tmp_path)
  assert np.isfinite(result["train_loss"]) and result["eval_examples"] > 0
  checkpoints = Checkpoints(tmp_path / "checkpoints")
  state = checkpoints.restore(checkpoints.latest_step(),
                              train.Trainer(config, train.make_mesh(0), 1, 1).state)
  checkpoints.close()
  params = {k: np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(state)[0]}
  assert all(p.dtype == np.float32 for p in params.values() if p.dtype.kind == "f")
  assert len(traces) == 1
  logged = [r["adder_p"] for r in read_metrics(tmp_path / "metrics.jsonl") if "adder_p" in r]
  np.testing.assert_allclose(logged, [1.5, 1.0], rtol=1e-6)  # The 2nd and 4th updates' p.
  # The model's exponents are those of the last update, the schedule's end.
  exponents = [v for k, v in params.items() if k[0].key == 0 and k[-2].key == "p"]
  assert len(exponents) == 5 and all(float(v) == 1.0 for v in exponents)


def test_adder_p_schedule_is_checked_with_the_config():
  with pytest.raises(ValueError, match="config.adder_p_schedule='constant:1.5' sets the exponent"):
    train.check_config(smoke_config(adder_p_schedule="constant:1.5", kind="conv"))


def test_abstract_state_is_the_structure_the_trainer_checkpoints():
  config = smoke_config(adder_p_schedule="constant:1.5")
  state = train.Trainer(config, train.make_mesh(0), 10, 5).state
  abstract = nnx.state(train.abstract_state(config))
  assert jax.tree.structure(abstract) == jax.tree.structure(state)
  assert ([(x.shape, x.dtype) for x in jax.tree.leaves(abstract)]
          == [(x.shape, x.dtype) for x in jax.tree.leaves(state)])
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))


def snapshot(directory):
  return {p.relative_to(directory): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


@pytest.mark.parametrize("problem", ["missing", "malformed"])
def test_bad_data_dir_is_named_and_the_workdir_is_untouched(uninterrupted, tmp_path, problem):
  import shutil
  workdir = tmp_path / "workdir"
  shutil.copytree(uninterrupted[0], workdir)
  before = snapshot(workdir)
  data_dir = tmp_path / "mnist"
  if problem == "malformed":
    data_dir.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
      (data_dir / name).write_bytes(b"not an idx file")
  config = smoke_config(data_source="idx", data_dir=str(data_dir))
  with pytest.raises(data.DataError, match=str(data_dir)):
    train.train_and_evaluate(config, workdir)
  assert snapshot(workdir) == before


@pytest.mark.parametrize("field, value", [
    ("model", "resnet21"), ("kind", "float"), ("dataset", "svhn"), ("dtype", "float16"),
    ("batch_size", 0), ("learning_rate", -1.0), ("momentum", 1.0), ("adder_lr", "ilr"),
    ("schedule", "step"), ("grad_mode", "exact"), ("implementation", "cuda"),
    ("image_size", 64), ("num_devices", 9), ("on_nonfinite", "ignore"),
    ("max_consecutive_skips", 0), ("adder_p_schedule", "cosine:2:1"),
    ("adder_p_schedule", "constant:0.5"),
])
def test_bad_config_field_is_named_before_anything_is_written(tmp_path, field, value):
  config = smoke_config()
  with config.unlocked():
    config[field] = value
  with pytest.raises(ValueError, match=f"config.{field}|{field}="):
    train.train_and_evaluate(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_batch_not_divisible_by_devices_is_named(tmp_path):
  with pytest.raises(ValueError, match="config.batch_size=36"):
    train.train_and_evaluate(smoke_config(batch_size=36), tmp_path)


def test_a_finished_run_is_neither_trained_nor_timed_again(uninterrupted, tmp_path, caplog):
  """Resuming a finished run took 30 s and reported ``train_seconds=5.351`` for no step."""
  import logging
  import shutil
  workdir = tmp_path / "workdir"
  shutil.copytree(uninterrupted[0], workdir)
  final = {k: v for k, v in uninterrupted[1].items() if k.startswith("eval_")}
  with caplog.at_level(logging.INFO, logger="experiments"):
    result = train.train_and_evaluate(smoke_config(), workdir)
  assert result == pytest.approx({**final, "step": 20.0, "train_seconds": 0.0})
  assert ("The checkpoint of step 20 is already the last of 20 steps: nothing to train; its "
          "evaluation is read from metrics.jsonl.") in caplog.text
  # Without that evaluation in metrics.jsonl the checkpoint is evaluated, still for no train time.
  lines = (workdir / "metrics.jsonl").read_text().splitlines(keepends=True)
  (workdir / "metrics.jsonl").write_text("".join(
      line for line in lines if not ('"eval_accuracy"' in line and json.loads(line)["step"] == 20)))
  result = train.train_and_evaluate(smoke_config(), workdir)
  assert result["eval_accuracy"] == pytest.approx(final["eval_accuracy"])
  assert result["step"] == 20 and result["train_seconds"] < 0.5
