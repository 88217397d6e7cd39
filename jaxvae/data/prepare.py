"""Getting a tfds dataset prepared, offline when possible, and the errors users see.

1. Prepared in `data_dir`: used as is.
2. `manual_dir` given: every original file must be there (else DatasetNotFoundError naming the
   missing ones) and IDX files well-formed; tfds then prepares from the folder with no network,
   verifying every file's size and SHA-256 (a mismatch -> CorruptDatasetFileError naming it).
3. Otherwise tfds downloads once (not with ``download=False``: commands that only read a
   trained model never start a download), with no HTTP retry, so that offline the
   DatasetNotFoundError comes at once, not after tfds's 10 retries with exponential backoff
   (minutes); as `DownloadConfig` has no retry field, tfds's `downloader.MAX_RETRIES` is set
   to 0 and left so (its other download threads read it after the first failed). There is no network
   probe: a network that drops packets costs a TCP connect timeout.
   tfds's progress bars are turned off: they would precede an offline error with empty bars.
"""

from __future__ import annotations

import contextlib
import difflib
import gzip
import io
import os
import shutil
import struct
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jaxvae import paths
from jaxvae.data import tf_support
from jaxvae.data.tf_support import DataConfigError


class DatasetNotFoundError(RuntimeError):
    """The dataset is not prepared and cannot be prepared from here; the message says which
    files to put in which folder and to set `--config.data.manual_dir=...`."""


class CorruptDatasetFileError(DatasetNotFoundError):
    """A file in `manual_dir` is not the original dataset file (truncated, wrong format...)."""


def source_files(builder: Any) -> list[tuple[str, str]]:
    """(filename, url) of every file tfds looks for in `manual_dir`, sorted by filename."""
    infos = type(builder).url_infos or {}
    return sorted((i.filename or url.rsplit("/", 1)[-1], url) for url, i in infos.items())


def validate_idx_gz(path: str, kind: str, expected_count: int | None = None) -> int:
    """Checks an MNIST-style IDX .gz file, returns its item count; else CorruptDatasetFileError.

    It must gunzip (CRC included), have the magic number of `kind` ("images": 2051, "labels":
    2049), 28x28 images, `expected_count` items (when given) and exactly the data its header
    announces. tfds's checksum rejects such files too, but cannot say what is wrong.
    """
    header_size, want_magic = (16, 2051) if kind == "images" else (8, 2049)

    def fail(why: str) -> CorruptDatasetFileError:
        return CorruptDatasetFileError(
            f"{path} is not a valid MNIST-format IDX {kind} file: {why}. Replace it with the "
            "original file from the dataset's authors (the .gz file exactly as downloaded)."
        )

    try:
        with gzip.open(path, "rb") as f:
            header = f.read(header_size)
            data_len = sum(len(chunk) for chunk in iter(lambda: f.read(1 << 20), b""))
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise fail(f"it does not decompress as gzip ({type(e).__name__}: {e})") from e
    if len(header) < header_size:
        raise fail(f"only {len(header)} bytes after decompression, header needs {header_size}")
    magic, count, *side = struct.unpack(f">{header_size // 4}I", header)
    item_size = side[0] * side[1] if side else 1
    if magic != want_magic:
        raise fail(f"magic number {magic}, expected {want_magic}")
    if side and side != [28, 28]:
        raise fail(f"images are {side[0]}x{side[1]}, expected 28x28")
    if expected_count is not None and count != expected_count:
        raise fail(f"it holds {count} items, expected {expected_count}")
    if data_len != count * item_size:
        raise fail(f"it has {data_len} data bytes, its header announces {count * item_size}")
    return count


def instructions(builder: Any, files: list[tuple[str, str]], folder: str | None) -> str:
    """What to do: which files to put in which folder, and the flag to set."""
    name, folder = builder.name, folder or f"/path/to/{builder.name}"
    lines = [f"Put these original files of {name} in the folder {folder}:"]
    lines += [f"  {os.path.join(folder, f)} (from {url})" for f, url in files]
    if not files:
        lines = [f"The original files of {name} are not known to tfds; see its catalog page."]
    return "\n".join(lines) + (
        f"\nThen run with --config.data.manual_dir={folder} (tensorflow-datasets prepares {name} "
        f"from those files with no network, into {builder.data_dir})."
    )


def check_manual_dir(builder: Any, manual_dir: str) -> None:
    """DatasetNotFoundError unless every source file is in `manual_dir`; IDX files validated."""
    name, files = builder.name, source_files(builder)
    missing = [(f, u) for f, u in files if not os.path.isfile(os.path.join(manual_dir, f))]
    if not os.path.isdir(manual_dir):
        why = f"config.data.manual_dir={manual_dir} is not a folder."
    elif missing:
        why = (
            f"{name} is not prepared in {builder.data_dir} and config.data.manual_dir="
            f"{manual_dir} lacks {len(missing)} of its {len(files)} original files."
        )
    else:
        for filename, _ in files if name in ("mnist", "fashion_mnist") else ():
            kind = "images" if "images" in filename else "labels"
            count = 60_000 if filename.startswith("train") else 10_000
            validate_idx_gz(os.path.join(manual_dir, filename), kind, count)
        return
    raise DatasetNotFoundError(f"{why}\n{instructions(builder, missing, manual_dir)}")


def _unknown_dataset(tfds: Any, name: str, cause: BaseException) -> DataConfigError:
    """The one-line message for a name tfds cannot build (its own messages run to hundreds of
    lines: the whole catalog), with the closest catalog names."""
    base = name.split("/")[0].split(":")[0]
    close = difflib.get_close_matches(base, tfds.list_builders(with_community_datasets=False))
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close and base not in close else ""
    why = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:300].rstrip(".")
    return DataConfigError(
        f"config.data.name={name!r} cannot be loaded by tensorflow-datasets ({why}).{hint} "
        "Use a catalog name such as 'mnist', 'fashion_mnist', 'binarized_mnist', 'cifar10' or "
        "'celeb_a' (set it with --config.data.name=...)."
    )


@contextlib.contextmanager
def _local_preparation_notes(name: str, manual_dir: str, dataset_dir: str) -> Iterator[None]:
    """tfds announces every preparation as "Downloading and preparing dataset Unknown size
    ..." and "Dataset <name> downloaded and prepared to ...": from ``manual_dir`` nothing is
    downloaded, so jaxvae says what happens instead. Anything else tfds prints on stdout is
    passed on (after the preparation)."""
    print(
        f"Preparing {name} in {dataset_dir} from the files in {manual_dir} (once: later runs "
        "read it there)...",
        flush=True,
    )
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            yield
    finally:
        for line in captured.getvalue().splitlines(keepends=True):
            if (
                "Downloading and preparing dataset" not in line
                and " downloaded and prepared " not in line
            ):
                sys.stdout.write(line)
    print(f"Prepared {name}.", flush=True)


def _folders_preparation_makes(builder: Any) -> list[Path]:
    """The folders tfds makes to prepare ``builder``'s dataset: its ``data_dir`` root, the
    folders down to the dataset's version folder, and the download folders."""
    root = Path(builder.data_dir_root)
    version_dir = Path(builder.data_dir)
    downloads = root / "downloads"
    return [
        *(f for f in [version_dir, *version_dir.parents] if f == root or root in f.parents),
        downloads,
        downloads / "extracted",
        downloads / "manual",
    ]


def prepared_builder(
    name: str, data_dir: str | None, manual_dir: str | None, *, download: bool = True
) -> Any:
    """A tfds builder whose data are prepared (see the module docstring); DataConfigError for
    a name tfds cannot build, or a ``data_dir`` that cannot hold the prepared dataset;
    DatasetNotFoundError for one that is not prepared, has no ``manual_dir`` and may not be
    downloaded (``download=False``)."""
    tfds = tf_support.import_tfds()
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except (ValueError, AssertionError) as e:  # unknown name, builder config or version
        raise _unknown_dataset(tfds, name, e) from e
    if builder.is_prepared():
        return builder
    manual_dir = os.path.expanduser(manual_dir) if manual_dir else None
    if not manual_dir and not download:  # nothing will be written: data_dir may be read-only
        raise DatasetNotFoundError(
            f"{name} is not prepared in {builder.data_dir}, and drawing samples or loading a "
            "trained model never downloads it (training or --mode eval does)\n"
            f"{instructions(builder, source_files(builder), manual_dir)}"
        )
    reason = paths.not_writable_reason(data_dir) if data_dir else None
    if reason is not None:
        raise DataConfigError(
            f"config.data.data_dir={data_dir} cannot hold the prepared {name} ({reason}); set "
            "--config.data.data_dir to a folder you can write to, or to one where it is prepared."
        )
    if manual_dir:
        check_manual_dir(builder, manual_dir)
    from tensorflow_datasets.core.download import download_manager, downloader

    how = f"from the files in {manual_dir}" if manual_dir else "by downloading it"
    config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    tfds.disable_progress_bar()  # tfds still prints what it downloads and prepares
    downloader.MAX_RETRIES = 0  # for good: a download thread still running must not retry
    notes = (
        _local_preparation_notes(name, manual_dir, builder.data_dir)
        if manual_dir
        else contextlib.nullcontext()
    )
    made = [f for f in _folders_preparation_makes(builder) if not f.exists()]
    root = Path(builder.data_dir_root)
    try:
        with notes:
            try:
                builder.download_and_prepare(download_config=config)
            except BaseException:  # failed or interrupted: leave data_dir as it was
                if root in made:  # made for this preparation: whatever tfds wrote there goes
                    shutil.rmtree(root, ignore_errors=True)
                else:  # tfds's download cache there may serve other datasets: empty folders only
                    paths.remove_if_empty(made)
                raise
    except download_manager.NonMatchingChecksumError as e:  # its message names the file
        raise CorruptDatasetFileError(
            f"preparing {name} {how} failed: a file's size or SHA-256 differs from tfds's "
            f"registered checksum, so it is not the original file; replace it.\n{e}"
        ) from e
    except (OSError, ValueError, RuntimeError, tfds.download.DownloadError) as e:
        hint = "" if manual_dir else " (offline, or the download host unreachable?)"
        raise DatasetNotFoundError(
            f"{name} is not prepared in {builder.data_dir}; preparing it {how} failed{hint}: "
            f"{type(e).__name__}: {e}\n{instructions(builder, source_files(builder), manual_dir)}"
        ) from e
    return builder
