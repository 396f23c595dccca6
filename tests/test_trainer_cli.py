"""The trainer's command line: flags from Config (simple-parsing), one-line errors."""

import dataclasses
import pathlib
import subprocess
import sys

import pytest

from examples import compare, input_pipeline, train
from examples import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _main(args, data_dir, workdir):
  defaults = ["--epochs=1", "--batch_size=128", "--no_robustness", "--no_progress"]
  paths = [f"--data_dir={data_dir}", f"--workdir={workdir}"]
  return train.main([*defaults, *paths, *args])  # The last of a flag wins.


def _error(capsys, args, data_dir, workdir):
  """The exit status and the standard error of a run that must fail."""
  with pytest.raises(SystemExit) as exit_:
    _main(args, data_dir, workdir)
  return exit_.value.code, capsys.readouterr().err.strip()


def test_every_setting_is_a_flag_with_help_and_default(capsys):
  with pytest.raises(SystemExit) as exit_:
    train.main(["--help"])
  assert exit_.value.code == 0
  text = " ".join(capsys.readouterr().out.split())
  for field in dataclasses.fields(train.Config):
    assert f"--{field.name}" in text, field.name
    start = " ".join(
      field.metadata["custom_args"]["help"].split()[:3]
    )  # Before any line break.
    assert start in text, field.name
  fields = len(dataclasses.fields(train.Config))
  assert text.count("(default:") >= fields


def test_flags_fill_the_config():
  args = config_lib.parse(
    ["--optimizer=lgm", "--no_robustness", "--sigmas", "0.1", "0.2", "--grad_accum=4"]
  )
  assert args.config == train.Config(
    optimizer="lgm",
    learning_rate=0.05,  # The optimizer's default, recorded as such.
    robustness=False,
    sigmas=(0.1, 0.2),
    grad_accum=4,
  )
  assert args.workdir == "workdir/lgm"


def _help_text(capsys) -> str:
  with pytest.raises(SystemExit):
    train.main(["--help"])
  return capsys.readouterr().out


def test_help_is_clean_and_lists_the_datasets(capsys):
  text = _help_text(capsys)
  flat = " ".join(text.split())
  assert "(default: None)" not in flat
  assert "the opposite" not in flat
  for line in text.splitlines():  # At most one default per flag.
    assert line.count("(default:") <= 1, line
  assert flat.count("(default: ") >= len(dataclasses.fields(train.Config))
  for name in input_pipeline.DATASETS:
    assert name in flat.split("options:")[1].split("--model")[0], name
  assert "--no_robustness" in flat and "--no_progress" in flat
  assert "go on from the latest checkpoint" in flat


def test_unknown_dataset_is_one_line_naming_the_choices(capsys):
  with pytest.raises(SystemExit) as exit_:
    config_lib.parse(["--dataset=minst"])
  assert exit_.value.code == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and "'minst'" in err and "fashion_mnist" in err


@pytest.mark.parametrize(
  ("argv", "optimizer", "rate"),
  [([], "sgd", 0.05), (["--optimizer=dgs"], "dgs", 3e-4),
   (["--optimizer=dgs", "--learning_rate=1e-3"], "dgs", 1e-3)],
)  # fmt: skip
def test_the_learning_rate_used_is_recorded(argv, optimizer, rate):
  from examples.optimizers import DEFAULT_LEARNING_RATES

  config = config_lib.parse(argv).config
  assert (config.optimizer, config.learning_rate) == (optimizer, rate)
  # A Config built in code, with the default left out, gets it too.
  default = config_lib.with_defaults(train.Config(optimizer=optimizer))
  assert default.learning_rate == DEFAULT_LEARNING_RATES[optimizer]


@pytest.mark.parametrize(
  ("argv", "rho"),
  [
    (["--optimizer", "sam"], 0.05),
    (["--optimizer", "layer_sam"], 0.01),
    (["--optimizer", "layer_sam", "--rho", "0.03"], 0.03),
    (["--optimizer", "sgd"], None),
  ],
)
def test_the_radius_used_is_the_optimizers_default_or_the_flag(argv, rho):
  assert config_lib.parse(argv).config.rho == rho


@pytest.mark.parametrize(
  ("args", "message"),
  [
    (["--learning_rate=-0.1"], "learning_rate=-0.1 must be positive"),
    (["--epochs=0"], "epochs=0 must be at least 1"),
    (["--mesh=model=2"], "mesh must be 'auto' or 'data=N'"),
    (["--mesh=data=99"], "asks for 99 devices"),
    (["--batch_size=5000"], "exceeds the 1437 training examples"),
    (["--model=mlp"], "invalid choice: 'mlp'"),
    (["--dataset=nope"], "nope"),
    (["--robustness_examples=0"], "robustness_examples=0 must be at least 1"),
  ],
)
def test_user_errors_print_one_line_and_exit_2(
  args, message, data_dir, tmp_path, capsys
):
  status, err = _error(capsys, args, data_dir, tmp_path)
  assert status == 2
  assert len(err.splitlines()) == 1 and message in err, err


def test_missing_data_prints_the_pipeline_message(
  data_dir, tmp_path, capsys, monkeypatch
):
  def missing(name, data_dir=None):
    raise FileNotFoundError(f"{name}: no data; install it with apt-get")

  monkeypatch.setattr(input_pipeline, "get_datasets", missing)
  status, err = _error(capsys, ["--dataset=mnist"], data_dir, tmp_path)
  assert status == 2
  assert err == "error: mnist: no data; install it with apt-get"


def test_resume_says_where_it_starts_and_rejects_other_settings(
  data_dir, tmp_path, capsys
):
  _main(["--optimizer=lgm", "--resume", "--max_steps=2"], data_dir, tmp_path)
  assert f"no checkpoint in {tmp_path}: starting from step 0" in capsys.readouterr().out
  _main(["--optimizer=lgm", "--resume", "--max_steps=3"], data_dir, tmp_path)
  assert f"resuming {tmp_path} from step 2" in capsys.readouterr().out
  status, err = _error(capsys, ["--optimizer=sgd", "--resume"], data_dir, tmp_path)
  assert status == 2 and len(err.splitlines()) == 1
  assert "optimizer='lgm'" in err and "optimizer='sgd'" in err, err


def test_a_run_prints_no_warning(data_dir, tmp_path):
  args = ["--max_steps=1", "--no_robustness", "--no_checkpoints", "--no_progress"]
  result = subprocess.run(
    [sys.executable, "-m", "examples.train", *args, f"--data_dir={data_dir}"]
    + [f"--workdir={tmp_path}"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr
  assert result.stderr.strip() == "", result.stderr
  assert "epoch 1: step 1 " in result.stdout


def test_compare_user_error_prints_one_line(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_:
    compare.main(["--dataset=nope", "--seeds=1", f"--out={tmp_path}", "--no_progress"])
  assert exit_.value.code == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "nope" in err, err
