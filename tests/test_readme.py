"""The README's code examples run as written."""

import pathlib
import re
import shutil
import subprocess

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_block_after(heading: str) -> str:
    text = README.read_text()
    section = text.split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_losses_example_runs(capsys):
    code = _python_block_after("## Using the losses in your own code")
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "negative ELBO" in out and "IWAE NLL (bits/dim)" in out
    # The example's numbers are real: the printed values parse as finite floats.
    numbers = [float(v) for v in re.findall(r"[-+]?\d+\.\d+(?:e[-+]?\d+)?", out)]
    assert len(numbers) == 2 and all(v == v and abs(v) < 1e6 for v in numbers)


def test_model_example_runs():
    code = _python_block_after("## The model: `jaxvae.models.VAE`")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["samples"].shape == (16, 28, 28, 1)
    assert scope["outputs"].shape == (8, 28, 28, 1) and scope["elbo"].shape == (8,)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_ci_reads_the_readme_commands():
    out = subprocess.run(
        ["bash", str(README.parent / ".ci" / "run"), "--print"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert out == ['pip install -e ".[tf,test]"', "python -m pytest -q -n 2 --dist loadfile"]
    # ... and they are the README's first code block, near its top.
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), re.S).group(1)
    assert first_block.splitlines() == out
