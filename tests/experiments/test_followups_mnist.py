"""experiments.followups_mnist: its configs, the curves it reads back, its tables and its arguments.

The runs themselves are the trainer's and the attacks' (tested in test_train.py and
tests/test_robustness.py); training them here would cost minutes of compilation.
"""

import json

import pytest

from experiments import followups_mnist
from experiments.train import check_config


@pytest.mark.parametrize("name", sorted(followups_mnist.LP_ROWS))
def test_the_lp_rows_are_valid_trainer_configs(name):
  kind, schedule, _ = followups_mnist.LP_ROWS[name]
  config = followups_mnist.lenet_config(kind, schedule, seed=3, epochs=2.0)
  check_config(config)
  assert (config.kind, config.adder_p_schedule, config.seed) == (kind, schedule, 3)
  assert (config.data_source, config.train_split, config.eval_split) == (
      "bundled", "test[:8000]", "test[8000:]")


def test_the_vit_rows_keep_their_config_unless_told():
  config = followups_mnist.vit_config("adder", seed=1, epochs=0.0)
  check_config(config)
  assert (config.model, config.kind, config.num_epochs, config.seed) == ("vit_tiny", "adder",
                                                                         20.0, 1)
  assert followups_mnist.vit_config("conv", seed=0, epochs=3.0).num_epochs == 3.0


def test_eval_curve_pairs_each_evaluation_with_its_epoch(tmp_path):
  records = [{"step": 31, "epoch": 0.5, "train_loss": 1.0},
             {"step": 62, "epoch": 1.0, "train_loss": 0.5},
             {"step": 62, "eval_accuracy": 0.9, "eval_loss": 0.3},
             {"step": 124, "epoch": 2.0, "train_loss": 0.2},
             {"step": 124, "eval_accuracy": 0.95}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  assert followups_mnist.eval_curve(tmp_path) == [(1.0, 0.9), (2.0, 0.95)]


def test_accuracy_table_gives_mean_and_sample_deviation_over_seeds():
  rows = {"cnn": {"0": {"accuracy": 0.99, "train_seconds": 10.0},
                  "1": {"accuracy": 0.98, "train_seconds": 12.0}},
          "adder_p1": {"0": {"accuracy": 0.985, "train_seconds": 20.0}}}
  table = followups_mnist.accuracy_table(rows, {"cnn": "CNN", "adder_p1": "AdderNet"})
  lines = table.splitlines()
  assert lines[2] == "| CNN | 98.50 +- 0.71% | 99.00, 98.00 | 11 |"  # s.d. 0.01 / sqrt(2)
  assert lines[3] == "| AdderNet | 98.50% | 98.50 | 20 |"


def test_attack_table_has_one_row_per_gradient_and_attack():
  def row(attack, gradient, epsilon, accuracy):
    return {"attack": attack, "gradient": gradient, "epsilon": epsilon, "accuracy": accuracy,
            "clean_accuracy": 0.99, "loss": 1.0}
  attacks = {"adder_p1": {"0": [row("fgsm", "surrogate", 0.1, 0.5), row("fgsm", "exact", 0.1, 0.4),
                                row("pgd7", "exact", 0.1, 0.2)],
                          "1": [row("fgsm", "surrogate", 0.1, 0.7), row("fgsm", "exact", 0.1, 0.4),
                                row("pgd7", "exact", 0.1, 0.1)]}}
  lines = followups_mnist.attack_table(attacks, [0.1]).splitlines()
  assert lines[0] == "| network | gradient | attack | clean | eps 0.1 |"
  assert lines[2:] == [
      "| AdderNet, p = 1 | exact | FGSM | 99.00 +- 0.00% | 40.00 +- 0.00% |",
      "| AdderNet, p = 1 | exact | PGD7 | 99.00 +- 0.00% | 15.00 +- 7.07% |",
      "| AdderNet, p = 1 | surrogate | FGSM | 99.00 +- 0.00% | 60.00 +- 14.14% |"]


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs must be positive"),
    (["--vit_epochs", "-1"], "--vit_epochs must be >= 0"),
    (["--epsilons", "0.1", "2"], "--epsilons must lie in"),
    (["--attack_images", "-5"], "--attack_images must be >= 0"),
    (["--parts", "lp", "nothing"], "--parts"),
])
def test_bad_arguments_are_named_before_anything_runs(argv, message, tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    followups_mnist.main(argv + ["--workdir", str(tmp_path / "runs")])
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err
  assert not (tmp_path / "runs").exists()
