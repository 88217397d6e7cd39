"""Per-op profile of jaxvae's train step: time per XLA fusion, with its HLO shape.

Traces a few steps with ``jax.profiler``, reads the XPlane file (its protobuf ships with
TensorFlow, an optional jaxvae dependency) and sums the duration of every XLA op event per
op name over all threads, per step. Each name is matched to its instruction in the compiled
step's optimized HLO, so one sees which layer and which pass (forward, ``transpose(jvp)``
= backward) an op belongs to. Run single-threaded for a profile whose sum is wall time:

    XLA_FLAGS=--xla_cpu_multi_thread_eigen=false python benchmarks/profile_step.py --config seed
"""

from __future__ import annotations

import argparse
import collections
import glob
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import add_malloc_flag, set_malloc  # noqa: E402  (imports no jax)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", choices=["seed", "mnist"], default="seed")
    p.add_argument("--conv-impl", default="auto")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=30)
    add_malloc_flag(p)
    args = p.parse_args()
    set_malloc(args.malloc)

    import jax
    from tensorflow.tsl.profiler.protobuf import xplane_pb2
    from throughput import TrainBench, load_config

    bench = TrainBench(load_config(args.config, None, args.conv_impl))
    bench.run(2)
    with tempfile.TemporaryDirectory() as logdir:
        jax.profiler.start_trace(logdir)
        bench.run(args.steps)
        jax.profiler.stop_trace()
        space = xplane_pb2.XSpace()
        space.ParseFromString(
            Path(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)[0]).read_bytes()
        )

    per_op = collections.Counter()
    for plane in space.planes:
        names = {k: v.name for k, v in plane.event_metadata.items()}
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):  # XLA's compute threads
                continue
            for event in line.events:
                name = names.get(event.metadata_id, "")
                if not name.startswith("ThunkExecutor"):
                    per_op[name] += event.duration_ps / 1e9 / args.steps
    hlo = {}
    for line in bench.step.as_text().splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*)", line)
        if m:
            hlo.setdefault(m.group(1), m.group(2))
    print(f"total of XLA ops: {sum(per_op.values()):.1f} ms/step (summed over threads)")
    for name, ms in per_op.most_common(args.top):
        text = hlo.get(name, "")
        op = re.search(r'op_name="([^"]*)"', text)
        print(f"{ms:8.2f} ms  {name:30s} {text.split(' ', 1)[0]:28s} {op.group(1) if op else ''}")


if __name__ == "__main__":
    main()
