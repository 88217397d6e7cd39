"""The documentation holds: its code examples run as written, its relative links resolve, and
``.ci/run`` finds the README's install and test commands."""

import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
DOCUMENTS = [README, *DOCS, ROOT / "benchmarks" / "README.md"]


def _python_block_after(path: pathlib.Path, heading: str) -> str:
    text = path.read_text()
    assert heading in text, f"{path.relative_to(ROOT)} has no heading {heading!r}"
    section = text.split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _run(path: pathlib.Path, heading: str) -> dict:
    scope: dict = {}
    code = _python_block_after(path, heading)
    exec(compile(code, str(path.relative_to(ROOT)), "exec"), scope)
    return scope


def test_readme_losses_example_runs():
    import jax
    import numpy as np

    scope = _run(README, "## Using the losses in your own code")
    grads = scope["grads"]
    assert jax.tree.map(np.shape, grads) == {"enc": (784, 16), "dec": (8, 784)}
    assert all(np.isfinite(g).all() and np.abs(g).sum() > 0 for g in jax.tree.leaves(grads))


def test_losses_example_runs(capsys):
    _run(ROOT / "docs" / "losses.md", "## Using the losses in your own code")
    out = capsys.readouterr().out
    assert "negative ELBO" in out and "IWAE NLL (bits/dim)" in out
    # The example's numbers are real: the printed values parse as finite floats.
    numbers = [float(v) for v in re.findall(r"[-+]?\d+\.\d+(?:e[-+]?\d+)?", out)]
    assert len(numbers) == 2 and all(v == v and abs(v) < 1e6 for v in numbers)


def test_model_example_runs():
    scope = _run(ROOT / "docs" / "model.md", "## The model: `jaxvae.models.VAE`")
    assert scope["samples"].shape == (16, 28, 28, 1)
    assert scope["outputs"].shape == (8, 28, 28, 1) and scope["elbo"].shape == (8,)


# Relative links. Anchors follow GitHub's rule: a heading's text, lower-cased, without
# markup and punctuation (letters, digits, "_", "-" and spaces stay), spaces as "-", and
# "-1", "-2", ... appended to repeats.

_FENCE = re.compile(r"^```.*?^```[ \t]*$", re.S | re.M)
_LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(([^)\s]+)\)")


def _prose(path: pathlib.Path) -> str:
    return _FENCE.sub("", path.read_text())


def _anchors(path: pathlib.Path) -> set[str]:
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for line in _prose(path).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))  # a link's text stays
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _relative_links(path: pathlib.Path) -> list[str]:
    links = _LINK.findall(_prose(path))
    return [t for t in links if not re.match(r"[a-z][a-z0-9+.-]*:", t)]  # no http:, mailto:


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    broken = []
    for target in _relative_links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT)}")
        elif anchor and (dest.suffix != ".md" or anchor not in _anchors(dest)):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{path.relative_to(ROOT)}: " + "; ".join(broken)


def test_anchor_rule(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# A: `b.c` (d) = e\n## Results, 2026-11-23\n```bash\n# not a heading\n```\n## x\n## x\n"
    )
    assert _anchors(page) == {"a-bc-d--e", "results-2026-11-23", "x", "x-1"}


def test_docs_index_lists_every_page():
    index = (ROOT / "docs" / "README.md").read_text()
    missing = [p.name for p in DOCS if p.name != "README.md" and f"({p.name})" not in index]
    assert not missing, f"docs/README.md does not link {missing}"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_ci_reads_the_readme_commands():
    out = subprocess.run(
        ["bash", str(ROOT / ".ci" / "run"), "--print"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out == ['pip install -e ".[tf,test]"', "python -m pytest -q -n 2 --dist loadfile"]
    # ... and they are the README's first code block, near its top.
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), re.S).group(1)
    assert first_block.splitlines() == out
