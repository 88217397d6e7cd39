"""jaxvae.host_memory: when the process is restarted with huge-page malloc, and that it is."""

import os
import subprocess
import sys
import textwrap

import pytest

from jaxvae import host_memory as hm

LINUX = dict(system="Linux", glibc=(2, 36), thp_mode="madvise", accelerator=False)


def test_adds_the_tunable_on_linux_glibc():
    env = hm.hugepage_environ({"PATH": "/bin"}, **LINUX)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


def test_keeps_other_tunables():
    env = hm.hugepage_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, **LINUX)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


@pytest.mark.parametrize(
    "environ, machine",
    [
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, LINUX),  # the user decided
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, LINUX),  # already restarted
        ({"JAXVAE_HUGEPAGES": "0"}, LINUX),
        ({"JAXVAE_HUGEPAGES": "off"}, LINUX),
        ({}, dict(LINUX, system="Darwin")),
        ({}, dict(LINUX, glibc=(2, 31))),  # the tunable exists from glibc 2.35
        ({}, dict(LINUX, thp_mode="never")),
        ({}, dict(LINUX, accelerator=True)),  # a GPU/TPU process stays as it was started
    ],
)
def test_leaves_the_process_alone(environ, machine):
    assert hm.hugepage_environ(environ, **machine) is None


def test_accelerator_detection_is_used_when_not_given():
    machine = dict(LINUX, accelerator=None)
    assert hm.hugepage_environ({"JAX_PLATFORMS": "tpu"}, **machine) is None
    env = hm.hugepage_environ({"JAX_PLATFORMS": "cpu"}, **machine)
    assert env is not None and env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_detection_does_not_import_jax():
    code = (
        "import os, sys\n"
        "from jaxvae import host_memory\n"
        "host_memory.hugepage_environ(os.environ)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'numpy')))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "modules, argv, interactive, expected",
    [
        ((), [__file__, "--flag"], False, True),  # python script.py / python -m package
        (("ipykernel",), [__file__], False, False),  # a Jupyter/Colab kernel
        (("IPython",), [__file__], False, False),  # ipython script.py
        ((), [__file__], True, False),  # python -i script.py
        ((), [""], False, False),  # the interactive interpreter
        ((), ["-c"], False, False),  # python -c '...'
        ((), ["-"], False, False),  # a script read from stdin cannot be read again
        ((), [], False, False),  # an embedded interpreter
        ((), ["/no/such/script.py"], False, False),
    ],
)
def test_can_reexec_only_a_command_line_that_runs_again(modules, argv, interactive, expected):
    assert hm.can_reexec(modules=modules, argv=argv, interactive=interactive) is expected


def test_a_kernel_is_never_restarted(tmp_path):
    """With ipykernel imported (as in a notebook), the restart is skipped, whatever the host."""
    body = """
        import os, sys
        sys.modules["ipykernel"] = type(sys)("ipykernel")  # what a Jupyter kernel has
        from jaxvae import host_memory
        print("start", flush=True)
        host_memory.reexec_with_hugepages()
        host_memory.reexec_with_default_malloc()
        print("body", host_memory.hugepages_active(), flush=True)
        """
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JAXVAE_HUGEPAGES")}
    assert _run_script(tmp_path, body, env) == ["start", "body False"]
    env["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=1"  # default malloc would need a restart
    assert _run_script(tmp_path, body, env) == ["start", "body True"]


def _run_script(tmp_path, body: str, env: dict[str, str], *args: str) -> list[str]:
    """Runs ``body`` as a script file (so that a restart re-runs it); its stdout lines."""
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent(body))
    proc = subprocess.run(
        [sys.executable, str(script), *args], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_reexec_restarts_once_with_the_same_command_line(tmp_path):
    """A script that calls reexec_with_hugepages runs its body once, in the restarted process."""
    body = """
        import os, sys
        from jaxvae import host_memory
        print("start", os.getpid(), flush=True)
        host_memory.reexec_with_hugepages()
        print("body", host_memory.hugepages_active(), sys.argv[1:], flush=True)
        """
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JAXVAE_HUGEPAGES")}
    lines = _run_script(tmp_path, body, env, "a", "--b=1")
    expected = hm.hugepage_environ(env) is not None  # what this machine supports
    starts = [line for line in lines if line.startswith("start")]
    assert len(starts) == (2 if expected else 1)
    assert len({s.split()[1] for s in starts}) == 1  # execve keeps the PID
    assert lines[-1] == f"body {expected} ['a', '--b=1']"
    assert sum(line.startswith("body") for line in lines) == 1


def test_reexec_with_default_malloc_drops_only_the_hugepage_tunable(tmp_path):
    """The benchmarks' ``--malloc default``: restarted without the tunable, others kept."""
    body = """
        import os
        from jaxvae import host_memory
        print("start", flush=True)
        host_memory.reexec_with_default_malloc()
        print(os.environ.get("GLIBC_TUNABLES"), os.environ.get("JAXVAE_HUGEPAGES"))
        """
    env = dict(os.environ, GLIBC_TUNABLES="glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
    lines = _run_script(tmp_path, body, env)
    assert lines == ["start", "start", "glibc.malloc.arena_max=2 0"]
