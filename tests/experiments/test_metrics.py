"""metrics.jsonl: strict JSON, null for non-finite values, never a torn line."""

import errno
import io
import json
import logging
import math
import os
import warnings

import pytest

from experiments import metrics
from experiments.metrics import MetricsError, MetricWriter, read_metrics

from .conftest import fill


def test_non_finite_values_are_written_as_null(tmp_path):
  writer = MetricWriter(tmp_path, enabled=True)
  writer.write(3, {"train_loss": math.nan, "eval_loss": math.inf, "accuracy": 0.5})
  writer.close()

  def reject(constant):
    raise ValueError(f"{constant} is not JSON")

  [line] = (tmp_path / "metrics.jsonl").read_text().splitlines()
  record = json.loads(line, parse_constant=reject)
  assert record["train_loss"] is None and record["eval_loss"] is None
  assert record["accuracy"] == 0.5 and record["step"] == 3
  assert read_metrics(tmp_path / "metrics.jsonl")[0]["train_loss"] is None


def test_an_unfinished_last_record_is_cut_off_when_the_file_is_opened(tmp_path, caplog):
  """A run killed while writing left half a line; the resumed run's records start a new one."""
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "train_loss": 2.0}\n{"step": 99, "tra')
  with caplog.at_level(logging.WARNING, logger="experiments"):
    writer = MetricWriter(tmp_path, enabled=True)
  writer.write(2, {"train_loss": 1.5})
  writer.close()
  assert ("Dropped the unfinished last record of" in caplog.text
          and '{"step": 99, "tra' in caplog.text)
  lines = path.read_text().splitlines()
  assert lines[0] == '{"step": 1, "train_loss": 2.0}' and len(lines) == 2
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


def test_a_file_of_one_unfinished_record_is_emptied(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 9')
  MetricWriter(tmp_path, enabled=True).close()
  assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_a_full_disk_fails_the_write_in_one_line_and_leaves_whole_lines(tmp_path, small_disk,
                                                                        monkeypatch):
  """Each record is one write; a write the disk cuts short is undone."""
  workdir = small_disk or tmp_path
  writer = MetricWriter(workdir, enabled=True)
  writer.write(1, {"train_loss": 2.0})
  # More than the rest of the file's page: the kernel writes part of it, then finds no space.
  big = {f"metric_{i:04d}": 0.5 for i in range(400)}
  if small_disk is not None:
    fill(small_disk)
  else:  # Not root: a write cut short, then a full disk, as the kernel would give them.
    writes = []

    def short_then_full(fd, data):
      writes.append(data)
      if len(writes) == 1:
        return os_write(fd, data[:100])
      raise OSError(errno.ENOSPC, "No space left on device")

    os_write = os.write
    monkeypatch.setattr(os, "write", short_then_full)
  with pytest.raises(MetricsError) as raised:
    writer.write(2, big)
  monkeypatch.undo()
  if small_disk is not None:
    (small_disk / "filler").unlink()  # For TensorBoard's last flush.
  writer.close()
  path = workdir / "metrics.jsonl"
  assert str(raised.value) == (f"Could not write the metrics: No space left on device ({path}); "
                               "the records before this one are intact.")
  assert raised.value.__suppress_context__  # One line: no chain of tracebacks.
  assert path.read_text().endswith("}\n")
  assert [r["step"] for r in read_metrics(path)] == [1]


class _Clock:
  """``time.perf_counter`` for the progress bar, moved by hand."""

  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_the_eta_leaves_out_the_compilation_of_the_first_step(monkeypatch):
  """The first ETA counted compilation: ``ETA 18m15s`` for a 17 s loop."""
  clock = _Clock()
  monkeypatch.setattr(metrics.time, "perf_counter", clock)
  stream = io.StringIO()
  bar = metrics.ProgressBar(100, stream=stream)
  clock.now += 60.0  # The first step: compilation.
  bar.compiled(1)
  bar.update(1, images_per_sec=1.0)  # No step timed after it yet.
  clock.now += 9.0  # Nine steps of one second.
  bar.update(10, images_per_sec=32.0)
  first, second = stream.getvalue().splitlines()
  assert " 1/100 " in first and "ETA — " in first
  assert " 10/100 " in second and "ETA 1m30s " in second  # 90 steps left at 1 s, not 7 s.
