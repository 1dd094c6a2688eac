"""experiments.evaluate (pretrained and workdir) and the trainer's config.init_from."""

import io
import json
import logging
import pickle
import re
import shutil
import tarfile

from flax import nnx
import jax
import numpy as np
import pytest

from adderjax import data, models
from adderjax.data import remote
from experiments import evaluate, init_from, train
from experiments.checkpoints import DIGEST_FILE
from experiments.configs import cifar10_resnet20
from experiments.result_files import write_result
from experiments.trained import load_run
from tests.data.file_server import serving
from tests.data.test_remote import patch_remote

NAME = "resnet20_cifar10"
ARCHIVE = "cifar-10-python.tar.gz"
NUM_IMAGES = 64


def cifar10_archive(images: np.ndarray, labels: np.ndarray) -> bytes:
  """A cifar-10-python.tar.gz in the authors' layout with ``images`` (N, 32, 32, 3) to test on."""
  rows = images.transpose(0, 3, 1, 2).reshape(len(images), 3 * 32 * 32)  # Channel-major rows.
  batches = {f"data_batch_{k}": (rows[:2], [0, 1]) for k in range(1, 6)}
  batches["test_batch"] = (rows, [int(label) for label in labels])
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
    for name, (batch_rows, batch_labels) in batches.items():
      content = pickle.dumps({b"data": batch_rows, b"labels": batch_labels}, protocol=2)
      info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
      info.size = len(content)
      tar.addfile(info, io.BytesIO(content))
  return buffer.getvalue()


def ranked_classes(logits: np.ndarray) -> np.ndarray:
  """Each row's classes from the highest logit to the lowest (numpy's own sort)."""
  return np.argsort(-logits, axis=-1, kind="stable")


def numpy_top_k(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
  ranks = ranked_classes(logits)
  return float(np.mean(ranks[:, 0] == labels)), float(np.mean(
      (ranks[:, :5] == labels[:, None]).any(-1)))


@pytest.fixture(scope="module")
def pretrained_model():
  return models.pretrained(NAME)


@pytest.fixture(scope="module")
def test_set(pretrained_model):
  """64 smooth random images and labels that put the model's top-1 right on 32 and top-5 on 48.

  Returns (images, labels, logits), the logits of the images normalised in numpy.
  """
  rng = np.random.default_rng(0)
  coarse = rng.integers(0, 256, (NUM_IMAGES, 4, 4, 3)).astype(np.float64)
  images = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)  # 4x4 colour blocks, as objects.
  images = np.clip(images + rng.normal(0, 20, images.shape), 0, 255).astype(np.uint8)
  record = models.PRETRAINED[NAME]
  normalized = (images / np.float32(255) - np.float32(record.mean)) / np.float32(record.std)
  logits = np.asarray(pretrained_model(normalized.astype(np.float32)))
  # The images whose first class leads the second most come first: there the label is the first
  # class, and no other summation order (batch size, jit) can flip it; elsewhere the label is
  # the 3rd class (top-5 only) or the last.
  top_two = np.sort(logits, -1)[:, -2:]
  order = np.argsort(top_two[:, 0] - top_two[:, 1], kind="stable")
  images, logits, margins = images[order], logits[order], (top_two[:, 1] - top_two[:, 0])[order]
  assert margins[:32].min() > 1e-2 * np.abs(logits).max()  # 1e-4 is the jit-eager difference.
  ranks = ranked_classes(logits)
  labels = np.concatenate([ranks[:32, 0], ranks[32:48, 2], ranks[48:, 9]])
  assert numpy_top_k(logits, labels) == (0.5, 0.75)
  return images, labels, logits


@pytest.fixture
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv(remote.ENV_DATA_DIR, str(tmp_path / "cache"))
  monkeypatch.delenv(remote.ENV_MIRROR, raising=False)
  monkeypatch.chdir(tmp_path)
  return tmp_path / "cache"


@pytest.fixture
def server(test_set, cache, monkeypatch):
  """The archive served at $ADDERJAX_DATA_MIRROR; REMOTES holds its MD5 and a refused URL."""
  files = {ARCHIVE: cifar10_archive(*test_set[:2])}
  patch_remote(monkeypatch, "cifar10", files)
  with serving(files) as server:
    monkeypatch.setenv(remote.ENV_MIRROR, server.url)
    yield server


def test_pretrained_downloads_and_matches_numpy_top_k(server, cache, tmp_path, capsys):
  assert evaluate.main(["--pretrained", NAME, "--batch_size", "24"]) == 0  # 24+24+16 (padded).
  out = capsys.readouterr().out
  assert f"{NAME}: top-1 50.00%, top-5 75.00% on 64 images of cifar10 test" in out
  result = json.loads((tmp_path / f"evaluation_{NAME}.json").read_text())
  assert (result["num_images"], result["correct_top1"], result["correct_top5"]) == (64, 32, 48)
  assert (result["top1"], result["top5"]) == (0.5, 0.75)
  assert (result["pretrained"], result["model"], result["dataset"], result["split"],
          result["dtype"], result["batch_size"]) == (NAME, "resnet20", "cifar10", "test",
                                                     "float32", 24)
  assert server.requests[ARCHIVE] == 1
  assert (cache / "cifar10" / "cifar-10-batches-py" / "test_batch").is_file()


def test_limit_a_cached_set_and_a_kept_earlier_result(server, test_set, tmp_path, capsys):
  _, labels, logits = test_set
  output = tmp_path / "out" / "result.json"
  for limit in (40, 20):  # The same result twice keeps nothing: see test_write_result_*.
    assert evaluate.main(["--pretrained", NAME, "--limit", str(limit), "--batch_size", "16",
                          "--output", str(output)]) == 0
  assert server.requests[ARCHIVE] == 1  # Downloaded once, then read from the cache.
  out = capsys.readouterr().out
  assert out.count("kept as") == 1 and str(output.with_name("result.1.json")) in out
  for path, limit in ((output, 20), (output.with_name("result.1.json"), 40)):
    result = json.loads(path.read_text())
    assert result["limit"] == result["num_images"] == limit
    assert (result["top1"], result["top5"]) == numpy_top_k(logits[:limit], labels[:limit])
  assert sorted(p.name for p in output.parent.iterdir()) == ["result.1.json", "result.json"]


def test_data_dir_needs_no_network(test_set, cache, tmp_path, monkeypatch, capsys):
  images, labels, logits = test_set
  with tarfile.open(fileobj=io.BytesIO(cifar10_archive(images, labels))) as tar:
    tar.extractall(tmp_path / "cifar", filter="data")
  patch_remote(monkeypatch, "cifar10", {ARCHIVE: b"never fetched"})
  assert evaluate.main(["--pretrained", NAME, "--data_dir",
                        str(tmp_path / "cifar" / "cifar-10-batches-py"), "--limit", "8"]) == 0
  result = json.loads((tmp_path / f"evaluation_{NAME}.json").read_text())
  assert (result["top1"], result["top5"]) == numpy_top_k(logits[:8], labels[:8])


def test_offline_is_one_line_and_exit_1(cache, monkeypatch, capsys):
  patch_remote(monkeypatch, "cifar10", {ARCHIVE: b"unreachable"})  # Only a refused URL left.
  assert evaluate.main(["--pretrained", NAME]) == 1
  captured = capsys.readouterr()
  assert captured.out == ""
  [line] = captured.err.strip().splitlines()
  assert line.startswith("python -m experiments.evaluate: error: No network: the cifar10 test "
                         "set could not be downloaded")
  assert "--data_dir" in line and remote.ENV_MIRROR in line and "Traceback" not in line
  assert not list(cache.rglob("*.json"))


def test_bad_options_are_usage_errors(capsys):
  for argv in (["--pretrained", "resnet99"], ["--pretrained", NAME, "--limit", "0"], []):
    with pytest.raises(SystemExit) as info:
      evaluate.main(argv)
    assert info.value.code == 2
  assert "--limit must be a positive number" in capsys.readouterr().err


def test_write_result_keeps_a_different_one_and_not_the_same(tmp_path):
  path = tmp_path / "evaluation.json"
  assert write_result(path, {"top1": 0.5, "seconds": 1.0}, volatile=["seconds"]) is None
  assert write_result(path, {"top1": 0.5, "seconds": 2.0}, volatile=["seconds"]) is None
  path.with_name("evaluation.1.json").write_text("taken")  # Numbers in use are skipped.
  kept = write_result(path, {"top1": 0.25, "seconds": 3.0}, volatile=["seconds"])
  assert kept == tmp_path / "evaluation.2.json"
  assert json.loads(kept.read_text()) == {"top1": 0.5, "seconds": 2.0}
  assert json.loads(path.read_text()) == {"top1": 0.25, "seconds": 3.0}
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "evaluation.1.json", "evaluation.2.json", "evaluation.json"]  # No temporary left.


# The trainer: config.init_from, and --workdir on the run it makes.


def resnet20_config(**overrides):
  """ResNet-20 on 32 synthetic CIFAR-10 images, 2 steps of 16, evaluated on 16."""
  config = cifar10_resnet20.get_config()
  config.update(data_source="synthetic", download=False, num_synthetic_examples=32,
                batch_size=16, eval_batch_size=16, eval_split="test[:16]", num_train_steps=2,
                log_every_steps=2, eval_every_steps=2, checkpoint_every_steps=1,
                progress_bar=False, num_devices=1)
  config.update(overrides)
  return config


def weights(model):
  state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def spy_first_state(monkeypatch):
  """The model the trainer's first step starts from, captured into the returned list."""
  seen = []
  original = train.Trainer.__init__

  def init(self, *args, **kwargs):
    original(self, *args, **kwargs)
    step = self.train_step

    def first_step(state, batch):
      if not seen:
        seen.append(weights(nnx.merge(self.graphdef, state)[0]))
      return step(state, batch)

    self.train_step = first_step

  monkeypatch.setattr(train.Trainer, "__init__", init)
  return seen


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory, pretrained_model):
  """A run from pretrained:resnet20_cifar10: (workdir, weights at step 0, messages, result)."""
  workdir = tmp_path_factory.mktemp("fine_tuned")
  logger = logging.getLogger("experiments")
  records = []
  handler = logging.Handler()
  handler.emit = records.append
  logger.addHandler(handler)
  level = logger.level
  logger.setLevel(logging.INFO)
  with pytest.MonkeyPatch.context() as patch:
    seen = spy_first_state(patch)
    try:
      result = train.train_and_evaluate(resnet20_config(init_from=f"pretrained:{NAME}"), workdir)
    finally:
      logger.removeHandler(handler)
      logger.setLevel(level)
  return workdir, seen[0], [r.getMessage() for r in records], result


def test_init_from_pretrained_starts_from_its_weights(fine_tuned, pretrained_model):
  workdir, first, messages, _ = fine_tuned
  expected = weights(pretrained_model)
  assert first.keys() == expected.keys()
  for key in expected:
    np.testing.assert_array_equal(first[key], expected[key], err_msg=key)
  assert "Initialised the parameters and BatchNorm statistics from config.init_from=" \
      f"'pretrained:{NAME}'." in messages
  trained = weights(load_run(workdir).model)  # Two steps later the weights have moved.
  assert any(not np.array_equal(trained[k], expected[k]) for k in expected)


def test_a_resumed_run_restores_its_checkpoint_and_skips_init_from(fine_tuned, tmp_path,
                                                                   monkeypatch, caplog):
  workdir = tmp_path / "run"
  shutil.copytree(fine_tuned[0], workdir)
  monkeypatch.setattr(init_from, "load", lambda config: pytest.fail("init_from was read"))
  with caplog.at_level(logging.INFO, logger="experiments"):
    # Nothing left to train: the final evaluation is of the restored checkpoint.
    result = train.train_and_evaluate(resnet20_config(init_from=f"pretrained:{NAME}"), workdir)
  assert f"Resumed from the checkpoint of step 2 in {workdir}; config.init_from is not used." \
      in caplog.messages
  before = fine_tuned[3]
  assert result["step"] == 2 and result["eval_examples"] == before["eval_examples"] == 16
  assert result["eval_accuracy"] == before["eval_accuracy"]
  assert result["eval_loss"] == pytest.approx(before["eval_loss"], rel=1e-6)


def test_init_from_a_pth_file_reads_it_as_the_config_model(pretrained_model, tmp_path):
  path = tmp_path / "ResNet20-AdderNet.pth"
  path.write_bytes(models.PRETRAINED[NAME].path().read_bytes())
  loaded = weights(init_from.load(resnet20_config(init_from=str(path))))
  expected = weights(pretrained_model)
  assert all(np.array_equal(loaded[k], expected[k]) for k in expected)


@pytest.mark.parametrize("overrides, message", [
    (dict(model="resnet32"), "is a resnet20, but config.model='resnet32'"),
    (dict(kind="conv"), "holds AdderNet weights, but config.kind='conv'"),
    (dict(dataset="cifar100"),
     "has 10 classes \\(cifar10\\), but config.dataset='cifar100' has 100"),
    (dict(init_from="pretrained:resnet99"), "names no pretrained model"),
    (dict(init_from="no/such/file.pth"), "is neither 'pretrained:NAME'"),
    (dict(model="vgg_small", init_from="weights.pth"), "is read as a PyTorch checkpoint, which "
     "initialises only the models"),
])
def test_a_bad_init_from_is_named_before_the_workdir_is_touched(tmp_path, overrides, message):
  config = resnet20_config(init_from=f"pretrained:{NAME}")
  config.update(overrides)
  with pytest.raises(ValueError, match=f"^config.init_from='{config.init_from}' {message}"):
    train.train_and_evaluate(config, tmp_path / "workdir")
  assert not (tmp_path / "workdir").exists()


def test_an_unreadable_or_mismatched_pth_is_named(tmp_path):
  path = tmp_path / "garbage.pth"
  path.write_bytes(b"not a checkpoint")
  with pytest.raises(ValueError, match=re.escape(f"config.init_from='{path}' could not be read "
                                                "as a resnet20 checkpoint: ")):
    init_from.load(resnet20_config(init_from=str(path)))
  pth = tmp_path / "resnet20.pth"
  pth.write_bytes(models.PRETRAINED[NAME].path().read_bytes())
  with pytest.raises(ValueError, match="config.init_from=.* could not be read as a resnet32 "
                     "checkpoint: .*missing"):
    init_from.load(resnet20_config(init_from=str(pth), model="resnet32"))


def test_weights_of_another_architecture_do_not_fit():
  source = nnx.eval_shape(lambda: models.resnet20(rngs=nnx.Rngs(0)))
  target = nnx.eval_shape(lambda: models.resnet20(num_classes=100, rngs=nnx.Rngs(0)))
  config = resnet20_config(init_from=f"pretrained:{NAME}")
  # The first of the names in order that differ: the BatchNorm on the logits.
  with pytest.raises(ValueError, match=r"does not fit config.model='resnet20' .*: \['bn2'\]"
                     r"\['bias'\] has shape \(10,\), the model's \(100,\)\.$"):
    init_from.copy_weights(source, target, config)


def numpy_evaluation(workdir, step, limit):
  """Top-1 and top-5 of checkpoint ``step`` on the run's eval split, normalised in numpy."""
  run = load_run(workdir, step=step)
  config = run.config
  source = data.load_source("cifar10", config.eval_split, source="synthetic", seed=config.seed)
  spec = data.DATASETS["cifar10"]
  images = (source.images[:limit] / np.float32(255) - np.float32(spec.mean)) / np.float32(spec.std)
  logits = np.asarray(run.model(images.astype(np.float32)))
  return numpy_top_k(logits, source.labels[:limit])


def test_workdir_evaluates_the_newest_good_checkpoint(fine_tuned, tmp_path, capsys):
  workdir = tmp_path / "run"
  shutil.copytree(fine_tuned[0], workdir)
  assert evaluate.main(["--workdir", str(workdir), "--limit", "12", "--batch_size", "8"]) == 0
  result = json.loads((workdir / "evaluation.json").read_text())
  assert (result["step"], result["num_images"], result["split"]) == (2, 12, "test[:16]")
  assert (result["top1"], result["top5"]) == numpy_evaluation(workdir, 2, 12)
  assert f"{workdir} step 2: top-1 " in capsys.readouterr().out
  # Damage the newest checkpoint: the one before it is evaluated, and nothing is moved.
  victim = next(p for p in sorted((workdir / "checkpoints" / "2").rglob("*"))
                if p.is_file() and p.stat().st_size and p.name != DIGEST_FILE)
  victim.write_bytes(victim.read_bytes() + b"x")
  assert evaluate.main(["--workdir", str(workdir), "--limit", "12"]) == 0
  result = json.loads((workdir / "evaluation.json").read_text())
  assert result["step"] == 1 and (result["top1"], result["top5"]) == numpy_evaluation(
      workdir, 1, 12)
  assert (workdir / "evaluation.1.json").is_file() and (workdir / "checkpoints" / "2").is_dir()


def test_a_workdir_without_a_run_is_one_line(tmp_path, capsys):
  assert evaluate.main(["--workdir", str(tmp_path)]) == 1
  [line] = capsys.readouterr().err.strip().splitlines()
  assert "config.json is missing" in line
