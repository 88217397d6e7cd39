"""The command line: bad input gives one clear message, exit status != 0, and writes nothing.

None of these compile anything: every check runs before the model is built.
"""

import subprocess
import sys
from pathlib import Path

import pytest
from multiprocess_launcher import mock_data

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")


def run_cli(train_py, capsys, *argv):
    code = train_py(*argv)
    return code, capsys.readouterr().err


def test_unknown_config_key_via_python_train_py():
    proc = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/tiny.py", "--config.bach_size=8"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Unknown config key 'bach_size'" in proc.stderr
    assert "Did you mean batch_size" in proc.stderr and "data.manual_dir" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_nested_key_in_process(capsys, tmp_path, train_py):
    code, err = run_cli(train_py, capsys, "--config", TINY, "--config.model.latnt_dim=3")
    assert code == 2 and "model.latnt_dim" in err and "model.latent_dim" in err


def test_batch_not_divisible_by_devices(capsys, tmp_path, train_py):
    wd = tmp_path / "wd"
    code, err = run_cli(
        train_py, capsys, "--config", TINY, f"--workdir={wd}", "--config.batch_size=12"
    )
    assert code == 1
    assert "config.batch_size=12 is not divisible by the number of devices (8)" in err
    assert "--config.batch_size=16" in err
    assert not wd.exists()


def test_missing_dataset_offline(capsys, tmp_path, train_py):
    """No network, an empty data_dir and no manual_dir: the pipeline's instructions, exit 1."""
    wd = tmp_path / "wd"
    code, err = run_cli(
        train_py,
        capsys,
        "--config",
        TINY,
        f"--workdir={wd}",
        f"--config.data.data_dir={tmp_path / 'tfds'}",
    )
    assert code == 1
    assert err.startswith("error: ") and "--config.data.manual_dir=" in err
    assert "train-images-idx3-ubyte.gz" in err and "Traceback" not in err
    assert not wd.exists()


def test_eval_mode_without_checkpoint(capsys, tmp_path, train_py):
    wd = tmp_path / "wd"
    wd.mkdir()
    with mock_data(num_examples=8):
        code, err = run_cli(train_py, capsys, "--config", TINY, f"--workdir={wd}", "--mode=eval")
    assert code == 1 and "No checkpoints in" in err and "train first" in err
    assert "is inside the run" not in err
    assert list(wd.iterdir()) == []
    # wd taken for a run's folder: inside a workdir (its config.json), the message says so.
    (tmp_path / "config.json").write_text("{}")
    with mock_data(num_examples=8):
        code, err = run_cli(train_py, capsys, "--config", TINY, f"--workdir={wd}", "--mode=eval")
    assert code == 1 and err.strip().endswith(
        f"{wd} is inside the run in {tmp_path}: use --workdir {tmp_path}."
    ), err


def test_ctrl_c_outside_the_training_loop_exits_at_once(capsys, tmp_path, train_py, monkeypatch):
    """Ctrl-C during ``--mode eval`` (or set-up): one line, then ``os._exit(130)``, skipping the
    interpreter's shutdown, which crashed (exit 139) with an evaluation still running."""
    from jaxvae import cli, inference

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    def exit_now(code):
        raise SystemExit(f"os._exit({code})")

    monkeypatch.setattr(inference, "evaluate_workdir", interrupted)
    monkeypatch.setattr(cli.os, "_exit", exit_now)
    code, err = run_cli(train_py, capsys, "--config", TINY, f"--workdir={tmp_path}", "--mode=eval")
    assert code == "os._exit(130)"
    assert err == "error: interrupted; nothing was saved.\n"


@pytest.mark.parametrize(
    "content, words",
    [
        (None, "does not exist"),
        ("def get_config(:\n", "failed: SyntaxError"),
        ("x = 1\n", "defines no get_config()"),
        ("def get_config():\n    return 1 / 0\n", "failed: ZeroDivisionError: division by zero"),
        ("def get_config():\n    return {}\n", "returned dict, not a ConfigDict"),
    ],
    ids=["missing", "syntax error", "no get_config", "get_config raises", "not a ConfigDict"],
)
def test_a_config_file_that_cannot_be_used(capsys, tmp_path, train_py, content, words):
    """One line naming the file (absl's own loader would print a traceback); nothing made."""
    path = tmp_path / "my_config.py"
    if content is not None:
        path.write_text(content)
    wd = tmp_path / "wd"
    code, err = run_cli(train_py, capsys, "--config", str(path), f"--workdir={wd}")
    assert code == 2 and err.count("error:") == 1 and "Traceback" not in err, err
    assert repr(str(path)) in err and words in err, err
    assert not wd.exists()


def test_quiet_logging_keeps_warnings_but_not_the_unprepared_dataset_notice(tmp_path):
    """train.py's logging: tensorflow-datasets' "Variant folder ... has no dataset_info.json"
    (a dataset not prepared there, which jaxvae prepares or reports in its own words) is
    dropped; other warnings are kept."""
    import logging

    from absl import logging as absl_logging

    from jaxvae import cli
    from jaxvae.data import tf_support

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    absl_logger = absl_logging.get_absl_logger()
    absl_logger.addHandler(handler)
    try:
        cli.quiet_logging()
        tfds = tf_support.import_tfds()
        (tmp_path / "mnist" / "3.0.1").mkdir(parents=True)  # a folder without the dataset
        assert not tfds.builder("mnist", data_dir=str(tmp_path)).is_prepared()
        absl_logging.warning("a warning of the program's own")
    finally:
        absl_logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["a warning of the program's own"]
