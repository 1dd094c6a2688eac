"""The command line, python -m adderjax.profiling, in process and once as a subprocess."""

import io
import os
import pathlib
import subprocess
import sys

import pytest

from adderjax.profiling import human, main

ROOT = pathlib.Path(__file__).parents[2]


def _run(*argv):
  out = io.StringIO()
  assert main(list(argv), out=out) == 0
  return out.getvalue()


def _row(text, label):
  """The cells of the line of ``text`` that starts with ``label``."""
  (line,) = [line for line in text.splitlines() if line.startswith(label)]
  return line[len(label):].split()


def test_compare_lenet5():
  text = _run("lenet5_bn", "--compare")
  assert text.startswith("lenet5_bn, input 28x28x1, per example\n")
  assert _row(text, "per example") == ["CNN", "AdderNet", "BNN"]
  assert _row(text, "multiplications") == ["416.52K", "0", "118.44K"]
  assert _row(text, "additions") == ["416.52K", "833.04K", "416.52K"]
  assert _row(text, "xnor") == ["0", "0", "298.08K"]
  assert _row(text, "params") == ["61.94K"] * 3
  # 416,520 * 4.6 pJ, 833,040 * 0.9 pJ; the BNN's XNORs have no figure, hence the star.
  assert _row(text, "energy (fp32_45nm)") == ["1.92", "uJ", "750", "nJ", "813", "nJ*"]
  assert _row(text, "latency (via_nano_2000)") == ["2.50M", "cycles", "1.67M", "cycles",
                                                   "1.31M", "cycles*"]
  assert text.rstrip().endswith("* XNOR not included: the table has no figure for it.")


def test_layers_of_resnet20_cnn():
  text = _run("resnet20", "--kind", "conv", "--energy", "int8_45nm")
  assert text.startswith("resnet20 (CNN), input 32x32x3, per example\n")
  assert _row(text, "conv1 ") == ["Conv", "mac", "32x32x16", "442.37K", "442.37K", "442.37K",
                                  "0", "432"]
  assert _row(text, "layer2/0/downsample/conv") == ["Conv", "mac", "16x16x32", "131.07K",
                                                    "131.07K", "131.07K", "0", "512"]
  assert _row(text, "fc") == ["Linear", "mac", "10", "640", "640", "640", "0", "640"]
  assert _row(text, "multiplications") == ["40.81M"]
  # 40,813,184 * (0.2 + 0.03) pJ.
  assert _row(text, "energy (int8_45nm)") == ["9.39", "uJ"]
  assert "XNOR not included" not in text


def test_input_shape_and_num_classes():
  text = _run("resnet18", "--kind", "conv", "--input-shape", "32,32,3", "--num-classes", "10")
  assert text.startswith("resnet18 (CNN), input 32x32x3, per example\n")
  assert _row(text, "fc") == ["Linear", "mac", "10", "5.12K", "5.12K", "5.12K", "0", "5.13K"]


def test_bnn_vgg_small():
  text = _run("vgg_small", "--kind", "binary")
  assert _row(text, "convs/1") == ["BinaryConv", "binary", "32x32x128", "150.99M", "0",
                                   "150.99M", "150.99M", "147.46K"]
  # The first convolution and the classifier stay full precision.
  assert _row(text, "xnor") == [human(607_600_640 - 3_538_944 - 81_920)]


@pytest.mark.parametrize("argv, message", [
    (["resnet99"], "invalid choice: 'resnet99'"),
    (["resnet20", "--kind", "ternary"], "invalid choice: 'ternary'"),
    (["resnet20", "--energy", "fp64_45nm"], "invalid choice: 'fp64_45nm'"),
    (["resnet20", "--input-shape", "32,32"], "must be three positive ints H,W,C"),
    (["resnet20", "--input-shape", "32,x,3"], "got '32,x,3'"),
    (["resnet20", "--num-classes", "0"], "must be a positive int, got '0'"),
    (["lenet5_bn", "--input-shape", "32,32,3"], "cannot count lenet5_bn on a (32, 32, 3) input"),
])
def test_bad_arguments_exit_2(argv, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    main(argv, out=io.StringIO())
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err


def test_python_dash_m():
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  argv = [sys.executable, "-m", "adderjax.profiling", "resnet32", "--kind", "conv"]
  result = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env, check=False,
                          timeout=120)
  assert result.returncode == 0, result.stderr
  # The paper's 69.12M.
  assert _row(result.stdout, "multiplications") == ["69.12M"]
  assert _row(result.stdout, "latency (via_nano_2000)") == [human(69_124_736 * 6), "cycles"]
