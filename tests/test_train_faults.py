"""Runs that go wrong: bad input, divergence, storage faults (in-process, tfds mock data).

Every refusal must exit non-zero with one ``error:`` message (no traceback) and leave the
workdir byte-identical; a diverged run must leave no non-finite value on disk and keep its good
"best" checkpoint; a checkpoint that cannot be written must be one clear error that loses no
result.
"""

import dataclasses
import hashlib
import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from multiprocess_launcher import mock_data

from jaxvae import checkpointing, config_utils, inference, run_setup, train_lib

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")


def tiny_config(**overrides):
    config = config_utils.load_config_file(TINY)
    for k, v in overrides.items():
        target = config
        *parents, leaf = k.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = v
    return config


def snapshot(workdir: Path) -> dict[str, str]:
    """Path -> content hash of every file under ``workdir`` (folders included by name)."""
    return {
        str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest()
        if p.is_file()
        else "dir"
        for p in sorted(workdir.rglob("*"))
    }


@pytest.fixture(scope="module")
def mock():
    with mock_data(num_examples=40):
        yield


@pytest.fixture(scope="module")
def trained(mock, tmp_path_factory):
    """A finished 4-step tiny run (checkpoints 2 and 4, evaluated at 4)."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    train_lib.train_and_evaluate(tiny_config(), workdir)
    return workdir


BAD_INPUTS = [
    # (overrides, words the single error message must contain)
    (["--config.model.latent_dim=0"], ["config.model.latent_dim=0", "integer >= 1"]),
    (["--config.eval.num_image_grid=0"], ["config.eval.num_image_grid=0"]),
    (["--config.data.center_crop=50"], ["center_crop=50", "28x28"]),
    (["--config.batch_size=32"], ["cannot be resumed", "batch_size: 16 -> 32"]),
    (["--config.seed=-1"], ["config.seed=-1"]),
    (["--config.num_train_steps=-2"], ["config.num_train_steps=-2"]),
    (["--config.num_train_steps=2"], ["trained to step 4", "last step, 2", "nothing to train"]),
    (["--config.num_train_steps=-1", "--config.num_epochs=0"], ["num_epochs must be > 0"]),
    (["--config.log_every_steps=0"], ["config.log_every_steps=0"]),
    (["--config.keep_checkpoints=0"], ["config.keep_checkpoints=0"]),
    (["--config.objective=iwea"], ["config.objective='iwea'", "'elbo'"]),
    (["--config.beta=-1"], ["config.beta=-1"]),
    (["--config.optimizer.learning_rate=0"], ["config.optimizer.learning_rate=0"]),
    (["--config.optimizer.learning_rate=nan"], ["config.optimizer.learning_rate=nan"]),
    (["--config.optimizer.b2=1.0"], ["config.optimizer.b2=1.0"]),
    (["--config.optimizer.decay_rate=0"], ["config.optimizer.decay_rate=0"]),
    (["--config.optimizer.schedule=warmup_cosine"], ["warmup_steps > 0"]),
    (["--config.model.hidden_dims=()"], ["config.model.hidden_dims=()"]),
    (["--config.model.hidden_dims=(8,0)"], ["config.model.hidden_dims=(8, 0)"]),
    (["--config.model.likelihood=poisson"], ["config.model.likelihood='poisson'"]),
    (["--config.model.conv_impl=fast"], ["config.model.conv_impl='fast'"]),
    (["--config.model.dtype=float16"], ["config.model.dtype='float16'"]),
    (["--config.data.pixel_range=symmetric"], ["likelihood='bernoulli'", "pixel_range"]),
    (["--config.data.binarize=always"], ["config.data.binarize='always'"]),
    (["--config.data.image_size=0"], ["config.data.image_size=0"]),
    (["--config.eval.iwae_samples=0"], ["config.eval.iwae_samples=0"]),
    (["--config.eval.interpolation_steps=1"], ["config.eval.interpolation_steps=1"]),
    # A grid of 100000**2 samples hung in the pictures' program; 100000 interpolation steps
    # asked XLA for 632 GB (a traceback).
    (["--config.eval.num_image_grid=100000"], ["num_image_grid=100000", "from 1 to 64"]),
    (["--config.eval.interpolation_steps=100000"], ["interpolation_steps=100000", "to 64"]),
    (["--config.eval.batch_size=0"], ["config.eval.batch_size=0"]),
    (["--config.name=a/b"], ["config.name='a/b'"]),
    (["--config.batch_size=abc"], ["batch_size"]),
    (["--config.batch_sise=16"], ["Unknown config key 'batch_sise'"]),
    (["--config.data.name=mnistt"], ["config.data.name='mnistt'", "Did you mean 'mnist'"]),
    (["--config.data.name=mnist:9.9.9"], ["config.data.name='mnist:9.9.9'", "version 9.9.9"]),
]


@pytest.mark.parametrize("overrides,words", BAD_INPUTS, ids=[" ".join(o) for o, _ in BAD_INPUTS])
def test_bad_input_is_refused_before_anything(trained, mock, train_py, capsys, overrides, words):
    before = snapshot(trained)
    code = train_py("--config", TINY, f"--workdir={trained}", *overrides)
    err = capsys.readouterr().err
    assert code not in (0, None), err
    assert "Traceback" not in err and err.count("error:") == 1, err
    for w in words:
        assert w in err, err
    assert snapshot(trained) == before


def _cut_short(path: Path, keep: int = -7) -> None:
    """``path`` without its last bytes, as a full disk or a killed copy leaves it."""
    path.write_bytes(path.read_bytes()[:keep])


def _damage_eval_history(workdir: Path) -> None:
    (workdir / "eval_history.jsonl").write_text('{"step": 4, "test_neg_elbo": 5\n{"step": 4, "c\n')


def _lock_of_another_host(workdir: Path) -> None:
    from jaxvae import workdir_lock

    holder = dataclasses.replace(workdir_lock.Holder.this_process(), host="another-host.example")
    (workdir / workdir_lock.LOCK_NAME).write_text(json.dumps(dataclasses.asdict(holder)))


TRAIN = ("--config", TINY)
EVAL = ("--config", TINY, "--mode=eval")
DAMAGED = [
    # (what is damaged, how, train.py arguments, words the single error message must contain)
    ("config.json", lambda w: _cut_short(w / "config.json"), TRAIN, ["config.json is damaged"]),
    (  # no --config: the workdir's config.json is the config
        "config.json, eval",
        lambda w: _cut_short(w / "config.json"),
        ("--mode=eval",),
        ["config.json is damaged: it is not valid JSON", "rm "],
    ),
    (
        "metrics.jsonl",
        lambda w: _cut_short(w / "metrics.jsonl"),
        TRAIN,
        ["metrics.jsonl is damaged: line 2 is not valid JSON", "sed -i '2d'"],
    ),
    (
        "checkpoints/ gone",
        lambda w: shutil.rmtree(w / "checkpoints"),
        TRAIN,
        ["checkpoints is missing", "records training up to step 4", "start over"],
    ),
    (
        "checkpoints/ gone, eval",
        lambda w: shutil.rmtree(w / "checkpoints"),
        EVAL,
        ["checkpoints is missing", "put them back"],
    ),
    (
        "checkpoint metrics",
        lambda w: _cut_short(w / "checkpoints" / "4" / "metrics" / "metrics"),
        (*EVAL, "--checkpoint=best"),
        ["checkpoints/4/metrics/metrics (the evaluation metrics of checkpoint 4", "rm -r "],
    ),
    (
        "eval_history.jsonl",
        _damage_eval_history,
        EVAL,
        ["eval_history.jsonl is damaged: line 1", "sed -i '1d'"],
    ),
    (
        "lock of another host",
        _lock_of_another_host,
        TRAIN,
        ["in use by a run on another host", "cannot be checked from here", "rm "],
    ),
]


@pytest.mark.parametrize(
    "damage, args, words", [d[1:] for d in DAMAGED], ids=[d[0] for d in DAMAGED]
)
def test_damaged_workdir_is_refused(trained, mock, train_py, capsys, tmp_path, damage, args, words):
    """A damaged or inconsistent workdir: exit status 1 and one line naming the file and what
    to do; nothing in the workdir changes."""
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    damage(workdir)
    before = snapshot(workdir)
    code = train_py(*args, f"--workdir={workdir}")
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err and err.count("error:") == 1, err
    for w in words:
        assert w in err, err
    assert snapshot(workdir) == before


def test_eval_and_sample_from_the_workdir_config(trained, mock, train_py, capsys, tmp_path):
    """--mode eval|sample without --config use the workdir's config.json, with --config.eval.*
    and data-split overrides; an override that would change the trained run is refused."""
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    before = snapshot(workdir)
    code = train_py(
        "--mode=sample", f"--workdir={workdir}", "--config.model.latent_dim=5", "--config.seed=3"
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1 and "Traceback" not in err, err
    assert "--config.model.latent_dim, --config.seed would change the run" in err
    assert snapshot(workdir) == before
    nothing = tmp_path / "nothing"
    assert train_py("--mode=eval", f"--workdir={nothing}", "--config.eval.iwae_samples=2") == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and f"--workdir {nothing} holds no config.json" in err, err
    assert " is inside the run" not in err
    assert not nothing.exists()
    # A folder inside the run (its checkpoints, as the user might take it for the workdir).
    assert train_py("--mode=sample", f"--workdir={workdir}/checkpoints") == 2
    err = capsys.readouterr().err
    assert err.strip().endswith(
        f"{workdir}/checkpoints is inside the run in {workdir}: use --workdir {workdir}."
    ), err
    assert snapshot(workdir) == before
    code = train_py(
        "--mode=eval",
        f"--workdir={workdir}",
        "--config.eval.iwae_samples=2",
        "--config.data.eval_split=train",
    )
    assert not code, capsys.readouterr().err
    results = json.loads((workdir / "eval_results.json").read_text())
    assert (results["step"], results["iwae_samples"], results["eval_split"]) == (4, 2, "train")
    assert (workdir / "config.json").read_bytes() == (trained / "config.json").read_bytes()


@pytest.mark.multiprocess
def test_one_run_per_workdir(trained, mock, train_py, capsys, tmp_path, zygote):
    """While ``python train.py`` trains a workdir, a second and a third run of it are refused
    with one line naming the first (which goes on untouched) and --mode eval may read it; after
    SIGKILL, the lock it left is recognised as stale and the next run resumes."""
    from test_multiprocess import Run, _wait_for_line

    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    lock = workdir / "jaxvae.lock"
    never = [  # trains on and writes nothing more once started
        f"--config.{k}=100000"
        for k in (
            "num_train_steps",
            "log_every_steps",
            "eval_every_steps",
            "checkpoint_every_steps",
        )
    ]
    run = Run(workdir, zygote, *never, processes=1, common=False)
    first = run.procs[0].pid
    try:
        _wait_for_line(run, "Training tiny on", timeout=240)
        before = snapshot(workdir)
        for _ in range(2):
            code = train_py("--config", TINY, f"--workdir={workdir}", *never)
            err = capsys.readouterr().err
            assert code == 1, err
            assert err.count("error:") == 1 and "Traceback" not in err, err
            assert f"--workdir {workdir} is in use by another run (pid {first} on host " in err
        assert snapshot(workdir) == before
        assert run.procs[0].poll() is None  # the first run trains on
        code = train_py(*EVAL, f"--workdir={workdir}", "--config.eval.iwae_samples=2")
        err = capsys.readouterr().err
        assert not code, err
        assert f"{workdir} is being trained by another run (pid {first} on host " in err
    finally:
        run.kill()  # SIGKILL
    assert lock.exists()
    code = train_py("--config", TINY, f"--workdir={workdir}", "--config.num_train_steps=6")
    err = capsys.readouterr().err
    assert not code, err
    assert f"took over {lock} from a run that no longer runs (pid {first} on host " in err
    assert "Resumed from" in err and "at step 4" in err
    assert not lock.exists()


def test_workdir_that_is_a_file(mock, train_py, capsys, tmp_path):
    path = tmp_path / "file"
    path.write_text("not a folder")
    assert train_py("--config", TINY, f"--workdir={path}") == 1
    err = capsys.readouterr().err
    assert "is a file" in err and "Traceback" not in err
    assert path.read_text() == "not a folder"


def test_an_evaluation_out_of_memory_saves_the_step_and_says_what_to_lower(
    trained, mock, train_py, capsys, tmp_path, monkeypatch
):
    """XLA's RESOURCE_EXHAUSTED in the last evaluation (seen with `configs/mnist.py` and
    K = 10^7 samples in one decoder call: petabytes; raised here as XLA raises it, since the
    tiny model's program does not run out) was a traceback and lost the trained steps since
    the last checkpoint. Now: the step is saved without its evaluation, one line names the
    fields that size the programs, and the same command evaluates it on resume, with the
    results of the run that never ran out of memory."""
    import jax

    from jaxvae import cli

    def exit_now(code):
        raise SystemExit(f"os._exit({code})")

    def out_of_memory(*args, **kwargs):
        raise jax.errors.JaxRuntimeError(
            "RESOURCE_EXHAUSTED: Out of memory allocating 1849940464736000 bytes."
        )

    monkeypatch.setattr(cli.os, "_exit", exit_now)
    workdir = tmp_path / "run"
    args = ("--config", TINY, f"--workdir={workdir}")
    with monkeypatch.context() as m:
        m.setattr(train_lib, "run_eval", out_of_memory)
        assert train_py(*args) == "os._exit(1)"
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err, err
    assert "error: the CPU ran out of memory (RESOURCE_EXHAUSTED: " in err
    assert "--config.eval.memory_mb (evaluation). Run the same command with smaller" in err
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [2, 4]
    assert not (workdir / "results.json").exists()
    assert not train_py(*args), capsys.readouterr().err
    got = json.loads((workdir / "results.json").read_text())
    want = json.loads((trained / "results.json").read_text())
    assert {k: v for k, v in got.items() if k.startswith("test_")} == {
        k: v for k, v in want.items() if k.startswith("test_")
    }


def test_a_workdir_inside_another_runs_checkpoints_is_refused(trained, mock, train_py, capsys):
    """``--workdir W/checkpoints`` (or a folder in it) would put a second run among the first
    one's checkpoints; refused, nothing changed. A run in a folder of its own beside them
    (``W/sweep``) is not refused: only the checkpoints folder is another run's."""
    before = snapshot(trained)
    for inside in (trained / "checkpoints", trained / "checkpoints" / "new"):
        assert train_py("--config", TINY, f"--workdir={inside}") == 1
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and "Traceback" not in err, err
        assert f"is inside the checkpoints of the run in {trained}; train in a folder" in err
        assert snapshot(trained) == before
    run_setup.check_writable(trained / "sweep")  # raises nothing


def finite_everywhere(workdir: Path) -> None:
    """No NaN/inf in any JSON file or checkpoint array of ``workdir``."""
    for f in workdir.rglob("*.json*"):
        if f.is_file() and "checkpoints" not in f.parts:
            for line in f.read_text().splitlines():
                for v in _numbers(json.loads(line) if f.suffix == ".jsonl" else None):
                    assert math.isfinite(v), (f, line)
            if f.suffix == ".json":
                for v in _numbers(json.loads(f.read_text())):
                    assert math.isfinite(v), f
    manager = checkpointing.create_manager(workdir / "checkpoints", 3, read_only=True)
    try:
        for step in manager.all_steps():
            restored = manager.restore(step)
            for leaf in _leaves(restored["state"]):
                assert np.all(np.isfinite(np.asarray(leaf, np.float64))), step
    finally:
        manager.close()


def _numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)
    elif isinstance(obj, float):
        yield obj


def _leaves(tree):
    import jax

    return [x for x in jax.tree.leaves(tree) if np.asarray(x).dtype.kind == "f"]


def test_divergence_stops_with_the_good_checkpoint_kept(trained, mock, tmp_path, train_py, capsys):
    """A good start (4 steps, evaluated: the best), then a huge learning rate."""
    import shutil

    workdir = tmp_path / "diverge"
    shutil.copytree(trained, workdir)
    code = train_py(
        "--config",
        TINY,
        f"--workdir={workdir}",
        "--config.num_train_steps=12",
        "--config.optimizer.learning_rate=1e12",
        "--config.log_every_steps=4",
        "--config.checkpoint_every_steps=1",
        "--config.eval_every_steps=2",
    )
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Training diverged" in err and "Traceback" not in err and "learning_rate" in err
    manager = checkpointing.create_manager(workdir / "checkpoints", 3, read_only=True)
    try:
        latest = manager.latest_step()
        assert manager.best_step() == 4
    finally:
        manager.close()
    assert f"last good checkpoint is step {latest} " in err
    bad_step = int(err.split("NaN or infinite at step ")[1].split(".")[0])
    assert latest < bad_step <= 12
    finite_everywhere(workdir)
    # The best checkpoint is still there and can be evaluated.
    out = inference.evaluate_workdir(tiny_config(), workdir, "best")
    assert out["step"] == 4 and math.isfinite(out["test_neg_elbo"])


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return proc.returncode == 0


@pytest.mark.multiprocess
@pytest.mark.parametrize("fault", ["read_only", "no_space"])
def test_checkpoint_that_cannot_be_written(trained, mock, tmp_path, zygote, fault):
    """The checkpoints folder becomes read-only / full after step 2; ``python train.py`` (a
    subprocess: it exits without waiting for orbax's threads of the failed save) goes on to 4."""
    from test_multiprocess import Run

    workdir = tmp_path / "run"
    ckpt = workdir / "checkpoints"
    if not _mount_tmpfs(ckpt, "64m"):
        pytest.skip("needs permission to mount a tmpfs (root in a sandbox)")
    try:
        train_lib.train_and_evaluate(tiny_config(num_train_steps=2), workdir)
        if fault == "read_only":
            subprocess.run(["mount", "-o", "remount,ro", str(ckpt)], check=True)
        else:
            filler = ckpt / "filler"
            subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M"], capture_output=True)
        kept = snapshot(ckpt / "2")
        run = Run(workdir, zygote, processes=1, common=False)
        code = run.procs[0].wait(timeout=300)
        err = run.log(0)
        assert code == 1, err[-3000:]
        assert err.count("error:") == 1 and "Traceback" not in err, err[-3000:]
        assert f"Could not write a checkpoint in {ckpt}" in err
        assert "intact" in err and "resume" in err
        # The evaluation at step 4 reached metrics.jsonl and results.json.
        lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
        assert lines[-1]["step"] == 4 and "test_neg_elbo" in lines[-1]
        assert json.loads((workdir / "results.json").read_text())["step"] == 4
        # Step 2 is intact and restorable.
        assert snapshot(ckpt / "2") == kept
        manager = checkpointing.create_manager(ckpt, 3, read_only=True)
        try:
            assert manager.latest_step() == 2
            manager.restore(2)
        finally:
            manager.close()
    finally:
        subprocess.run(["umount", str(ckpt)], capture_output=True)
