"""metrics.jsonl: strict JSON, null for non-finite values."""

import json
import math

from experiments.metrics import MetricWriter, read_metrics


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
