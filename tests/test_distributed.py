"""When train.py joins JAX's distributed runtime: the rule of jaxvae.distributed, no processes."""

import json

import pytest

from jaxvae import distributed
from jaxvae.distributed import DistributedError, Options, plan

SLURM_STEP = {  # what srun sets in each task
    "SLURM_JOB_ID": "77",
    "SLURM_STEP_NODELIST": "node[1-2]",
    "SLURM_NTASKS": "4",
    "SLURM_PROCID": "2",
    "SLURM_LOCALID": "0",
}
# The timeouts passed to JAX: JAX's own deadline for joining comes after --join_timeout's (whose
# watchdog says what happened in one line; JAX's deadline aborts with a C++ stack dump).
HEARTBEAT = {
    "heartbeat_timeout_seconds": distributed.DEFAULT_HEARTBEAT_TIMEOUT_S,
    "initialization_timeout": distributed.DEFAULT_JOIN_TIMEOUT_S + 30,
}


def test_a_plain_machine_never_joins():
    assert not plan(Options(), {}).join
    assert not plan(Options(), {"SLURM_NTASKS": "4", "OMPI_COMM_WORLD_SIZE": "1"}).join
    assert not distributed.initialize(Options(), {}).join  # and initialize does nothing


def test_clusters_are_joined_with_no_arguments():
    p = plan(Options(), SLURM_STEP)
    assert (p.join, p.reason, p.kwargs) == (True, "SLURM, 4 tasks", HEARTBEAT)
    assert plan(Options(), {"OMPI_COMM_WORLD_SIZE": "2"}).reason == "Open MPI, 2 ranks"
    assert plan(Options(), {}, on_cloud_tpu=True).reason == "Cloud TPU VM"
    # The batch script itself (no srun step) and one-task steps run alone.
    assert not plan(Options(), {k: v for k, v in SLURM_STEP.items() if "STEP" not in k}).join
    assert not plan(Options(), {**SLURM_STEP, "SLURM_NTASKS": "1"}).join
    # --num_processes=1 overrides any launcher.
    assert not plan(Options(num_processes=1), SLURM_STEP, on_cloud_tpu=True).join


def test_explicit_flags_and_environment():
    p = plan(Options("10.0.0.2:1234", 2, 1, heartbeat_timeout_s=7, join_timeout_s=5), {})
    assert p.join and p.reason == "flags"
    assert p.kwargs == {
        "coordinator_address": "10.0.0.2:1234",
        "num_processes": 2,
        "process_id": 1,
        "heartbeat_timeout_seconds": 7,
        "initialization_timeout": 35,
    }
    env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "3", "JAX_PROCESS_ID": "2"}
    assert plan(Options(), env).kwargs["process_id"] == 2
    assert plan(Options(process_id=0), env).kwargs["process_id"] == 0  # a flag wins
    # On a cluster, JAX fills in what was not given.
    p = plan(Options(coordinator_address="node1:5000"), SLURM_STEP)
    assert p.reason == "flags and SLURM, 4 tasks" and "num_processes" not in p.kwargs


@pytest.mark.parametrize(
    "options, env, words",
    [
        (Options(num_processes=2), {}, "missing: --coordinator_address, --process_id"),
        (Options(coordinator_address="h:1"), {}, "missing: --num_processes, --process_id"),
        (Options("h:1", 2, 2), {}, "--process_id=2 must be in [0, 2)"),
        (Options(num_processes=0), {}, "--num_processes=0 must be >= 1"),
        (Options("localhost", 2, 0), {}, "must be host:port"),
        (Options(heartbeat_timeout_s=0), {}, "--heartbeat_timeout=0"),
        (Options(join_timeout_s=0), {}, "--join_timeout=0 must be >= 1 s"),
        (Options(), {"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two' is not an integer"),
    ],
)
def test_inconsistent_settings_say_what_to_pass(options, env, words):
    with pytest.raises(DistributedError) as e:
        plan(options, env)
    assert words in str(e.value)


def test_train_py_rejects_incomplete_process_flags(train_py, capsys, tmp_path):
    code = train_py("--config", "configs/tiny.py", "--workdir", str(tmp_path), "--num_processes=2")
    assert code == 2
    err = capsys.readouterr().err
    assert "error: several processes need --coordinator_address" in err
    assert not any(tmp_path.iterdir())


def test_settings_that_differ_are_named_with_their_processes(monkeypatch):
    """What every process says when the processes' settings differ (their texts as
    ``allgather_texts`` would gather them from three processes); one process always agrees."""
    distributed.check_same_settings({"config": {"batch_size": 16}})  # one process: nothing
    mine = {"--mode": "train", "config": {"batch_size": 16, "model": {"latent_dim": 4}}}
    other = {"--mode": "train", "config": {"batch_size": 32, "model": {"latent_dim": 4}}}
    texts = [json.dumps(distributed._flatten(s), sort_keys=True) for s in (mine, other, mine)]
    monkeypatch.setattr(distributed, "allgather_texts", lambda text: texts)
    with pytest.raises(distributed.ProcessMismatchError) as e:
        distributed.check_same_settings(mine)
    message = str(e.value)
    assert "the 3 processes of this run were started with different settings" in message
    assert "config.batch_size: 16 on processes 0, 2, 32 on process 1." in message
    assert "latent_dim" not in message and "--mode" not in message and "\n" not in message
