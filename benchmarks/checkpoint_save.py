"""CPU and wall seconds per checkpoint save: jaxvae's handler vs orbax's standard one.

Each variant runs in a fresh process (a process's first save compiles what it needs), saves a
config's replicated initial state ``--saves`` times through ``jaxvae.checkpointing`` (the train
state and the data-iterator JSON, waiting for each save), and prints the first save and the
mean of the others. ``standard`` swaps in orbax's ``StandardCheckpointHandler``, which saves
replica-parallel on CPU and TPU (what jaxvae used before); ``jaxvae`` is the handler of
:func:`jaxvae.checkpointing.create_manager`, one replica per array. The variants alternate
``--rounds`` times.

    python benchmarks/checkpoint_save.py --config configs/tiny.py --devices 8
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("standard", "jaxvae")


def child(variant: str, config_file: str, saves: int) -> None:
    """Saves the state ``saves`` times and prints one result line."""
    import jax
    import optax
    import orbax.checkpoint as ocp

    from jaxvae import checkpointing, config_utils
    from jaxvae import train_state as ts
    from jaxvae.mesh import make_mesh, replicate

    if variant == "standard":  # the one difference measured: orbax's handler and its save args
        checkpointing._state_handler = ocp.StandardCheckpointHandler  # noqa: SLF001
        ocp.args.PyTreeSave = ocp.args.StandardSave
    config = config_utils.load_config_file(config_file)
    model = ts.build_model(config, (28, 28, 1))
    mesh = make_mesh()
    tx = optax.adam(1e-3)
    state = replicate(jax.jit(lambda: ts.init_train_state(model, tx, 0))(), mesh)
    seconds = []
    with tempfile.TemporaryDirectory() as tmp:
        manager = checkpointing.create_manager(Path(tmp) / "checkpoints", keep=2)
        for step in range(1, saves + 1):
            cpu, wall = time.process_time(), time.perf_counter()
            checkpointing.save(manager, step, state, {"position": step})
            manager.wait_until_finished()
            seconds.append((time.process_time() - cpu, time.perf_counter() - wall))
        checkpointing.close(manager)
    rest = seconds[1:]
    mean = [sum(s[i] for s in rest) / len(rest) for i in (0, 1)]
    print(
        f"{variant:9s} {len(jax.devices())} device(s): first save {seconds[0][0]:.2f} CPU-s "
        f"({seconds[0][1]:.2f} s), then {mean[0]:.2f} CPU-s ({mean[1]:.2f} s) per save",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.py"))
    parser.add_argument("--devices", type=int, default=8, help="virtual CPU devices")
    parser.add_argument("--saves", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.config, args.saves)
        return
    flags = os.environ.get("XLA_FLAGS", "")
    env = {
        **os.environ,
        "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={args.devices}".strip(),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    for _ in range(args.rounds):
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--child", variant, "--config", args.config]
            subprocess.run([*cmd, "--saves", str(args.saves)], env=env, cwd=ROOT, check=True)


if __name__ == "__main__":
    main()
