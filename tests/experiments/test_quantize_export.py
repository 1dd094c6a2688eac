"""experiments.quantize and experiments.export on a tiny trained run."""

import argparse
import json
import shutil

import numpy as np
import pytest

from adderjax import export
from experiments import export as export_cli
from experiments import quantize as quantize_cli
from experiments import train
from experiments.checkpoints import DIGEST_FILE, CheckpointError
from experiments.configs import smoke
from experiments.trained import accuracy, add_run_arguments, load_run


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """Ten steps of LeNet-5-BN on 320 bundled MNIST images, evaluated on 128."""
  config = smoke.get_config()
  config.update(progress_bar=False, bn_recompute_batches=0, data_source="bundled",
                train_split="test[:320]", eval_split="test[320:448]", num_train_steps=10,
                eval_every_steps=10, checkpoint_every_steps=10)
  path = tmp_path_factory.mktemp("run")
  train.train_and_evaluate(config, path)
  return path


def test_quantize_cli_writes_a_row_per_setting(workdir, capsys):
  # One group: the same code path with less to compile (4 groups: tests/quant).
  assert quantize_cli.main(["--workdir", str(workdir), "--bits", "8", "--groups", "1",
                            "--calibration_batches", "2", "--report"]) == 0
  out = capsys.readouterr().out
  assert "float accuracy" in out and "conv1" in out
  rows = json.loads((workdir / "quantization.json").read_text())["rows"]
  assert [(r["method"], r["bits"]) for r in rows] == [("float", 32), ("nie2022", 8)]
  assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
  assert [layer["path"] for layer in rows[1]["layers"]] == ["conv1", "conv2", "fc1", "fc2", "fc3"]


def test_quantize_cli_merges_rows_and_keeps_a_different_table(workdir, tmp_path, capsys):
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  (copy / "quantization.json").unlink(missing_ok=True)
  common = ["--workdir", str(copy), "--groups", "1", "--calibration_batches", "2"]
  table = copy / "quantization.json"
  assert quantize_cli.main(common + ["--bits", "8", "4"]) == 0
  first = json.loads(table.read_text())["rows"]
  assert quantize_cli.main(common + ["--bits", "6"]) == 0
  rows = json.loads(table.read_text())["rows"]
  assert [(r["method"], r["bits"]) for r in rows] == [("float", 32), ("nie2022", 8),
                                                      ("nie2022", 6), ("nie2022", 4)]
  # Recomputed rows are the same results (only the timings differ): nothing is kept.
  assert [r["accuracy"] for r in rows if r["bits"] in (32, 8, 4)] == [
      r["accuracy"] for r in first]
  assert not (copy / "quantization.1.json").exists()
  # A row that a rerun replaces with another result: the earlier table is kept whole.
  record = json.loads(table.read_text())
  record["rows"][1]["accuracy"] = -1.0
  table.write_text(json.dumps(record))
  assert quantize_cli.main(common + ["--bits", "8"]) == 0
  assert "kept as" in capsys.readouterr().out
  kept = json.loads((copy / "quantization.1.json").read_text())
  assert kept["rows"][1]["accuracy"] == -1.0
  rows = json.loads(table.read_text())["rows"]
  assert len(rows) == 4 and rows[1]["accuracy"] == first[1]["accuracy"]
  # Other settings (calibration batches): a new table, the earlier one kept beside it.
  assert quantize_cli.main(common[:-1] + ["3", "--bits", "8"]) == 0
  assert [r["bits"] for r in json.loads(table.read_text())["rows"]] == [32, 8]
  assert len(json.loads((copy / "quantization.2.json").read_text())["rows"]) == 4


def test_export_cli_file_matches_the_quantized_model(workdir, tmp_path, capsys):
  output = tmp_path / "int8.jaxexport"
  assert export_cli.main(["--workdir", str(workdir), "--output", str(output), "--bits", "8",
                          "--groups", "1", "--calibration_batches", "2", "--platforms", "cpu",
                          "--check"]) == 0
  out = capsys.readouterr().out
  function, spec = export.load(output)
  assert spec["metadata"]["quantization"]["bits"] == 8
  assert spec["preprocessing"]["mean"] == [0.1307]
  run = load_run(workdir)
  reloaded = accuracy(run, function)
  assert f"Reloaded: accuracy {reloaded:.2%}" in out
  assert np.isfinite(reloaded)


def test_export_cli_writes_the_c_program(workdir, tmp_path, capsys):
  out_dir = tmp_path / "c"
  assert export_cli.main(["--workdir", str(workdir), "--bits", "8", "--groups", "1",
                          "--calibration_batches", "2", "--c", str(out_dir)]) == 0
  assert sorted(p.name for p in out_dir.iterdir()) == ["main.c", "model.c", "model.h"]
  assert "static memory" in capsys.readouterr().out
  assert "#define MODEL_INPUT_SIZE 784" in (out_dir / "model.h").read_text()
  with pytest.raises(SystemExit):
    export_cli.main(["--workdir", str(workdir), "--c", str(out_dir)])  # --c needs --bits


@pytest.mark.parametrize("several_methods, method", [(True, ["nie2022"]), (False, "nie2022")])
def test_run_arguments_defaults(several_methods, method):
  parser = argparse.ArgumentParser()
  add_run_arguments(parser, several_methods=several_methods)
  assert vars(parser.parse_args(["--workdir", "W"])) == {
      "workdir": "W", "method": method, "groups": 4, "keep_float": [],
      "calibration_batches": 10, "step": None}
  with pytest.raises(SystemExit):
    parser.parse_args([])  # --workdir is required.


def test_missing_workdir_is_explained(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_run(tmp_path)


def test_damaged_checkpoint_is_reported_not_moved(workdir, tmp_path):
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  step_dir = copy / "checkpoints" / "10"
  victim = next(p for p in sorted(step_dir.rglob("*")) if p.is_file() and p.stat().st_size
                and p.name != DIGEST_FILE)
  victim.write_bytes(victim.read_bytes() + b"x")
  with pytest.raises(CheckpointError, match="Checkpoint 10 .* is damaged"):
    load_run(copy)
  assert step_dir.is_dir()
