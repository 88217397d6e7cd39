"""Offline source files of a dataset: their expected names and structural checks.

tfds's download manager looks for `manual_dir/<filename>` of every URL it would download
before downloading. The filenames (and sizes) come from the builder's registered checksums
(`builder.url_infos`); `FALLBACK_FILES` covers the MNIST family when those are unavailable.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import struct
import zlib

from jaxvae.data.errors import CorruptDatasetFileError

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
MNIST_SIDE = 28

_IDX_FILES = {
    "train-images-idx3-ubyte.gz": ("images", 60_000),
    "train-labels-idx1-ubyte.gz": ("labels", 60_000),
    "t10k-images-idx3-ubyte.gz": ("images", 10_000),
    "t10k-labels-idx1-ubyte.gz": ("labels", 10_000),
}


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """One original file of a dataset, as tfds expects it in `manual_dir`."""

    filename: str
    url: str | None = None
    size: int | None = None  # bytes; None when unknown


# Used when tfds has no registered checksums for the builder (never for 4.9.x, but the
# table also documents what the IDX validator checks).
FALLBACK_FILES: dict[str, tuple[SourceFile, ...]] = {
    "mnist": tuple(SourceFile(f) for f in _IDX_FILES),
    "fashion_mnist": tuple(SourceFile(f) for f in _IDX_FILES),
    "binarized_mnist": tuple(
        SourceFile(f"binarized_mnist_{s}.amat") for s in ("train", "valid", "test")
    ),
    "cifar10": (SourceFile("cifar-10-binary.tar.gz"),),
}

# Datasets whose files are gzip-compressed IDX files (validated structurally).
IDX_DATASETS = frozenset({"mnist", "fashion_mnist"})


def expected_source_files(name: str, url_infos: dict | None) -> tuple[SourceFile, ...]:
    """The files tfds will look for in `manual_dir` for dataset `name`.

    Args:
      name: tfds dataset name.
      url_infos: `builder.url_infos` ({url: UrlInfo(size, checksum, filename)}) or None.
    Returns:
      The source files, sorted by filename; empty when unknown.
    """
    files = []
    for url, info in (url_infos or {}).items():
        filename = getattr(info, "filename", None) or url.rstrip("/").rsplit("/", 1)[-1]
        size = getattr(info, "size", None)
        files.append(SourceFile(filename, url, int(size) if size is not None else None))
    if not files:
        files = list(FALLBACK_FILES.get(name, ()))
    return tuple(sorted(files, key=lambda f: f.filename))


def missing_files(manual_dir: str, files: tuple[SourceFile, ...]) -> list[SourceFile]:
    """The expected files that are not regular files in `manual_dir`."""
    return [f for f in files if not os.path.isfile(os.path.join(manual_dir, f.filename))]


def validate_idx_gz(path: str, kind: str, expected_count: int | None = None) -> int:
    """Checks that `path` is a gzip-compressed MNIST-style IDX file; returns its item count.

    Checks: it gunzips (including the gzip CRC), the magic number matches `kind`
    ("images": 2051, "labels": 2049), images are 28x28, the item count equals
    `expected_count` (when given) and the decompressed length is exactly header + data.

    Raises:
      CorruptDatasetFileError naming the file and what is wrong.
    """
    if kind not in ("images", "labels"):
        raise ValueError(f"kind must be 'images' or 'labels', got {kind!r}")
    header_size = 16 if kind == "images" else 8

    def fail(why: str) -> CorruptDatasetFileError:
        return CorruptDatasetFileError(
            f"{path} is not a valid MNIST-format IDX {kind} file: {why}. Replace it with the "
            "original file from the dataset's authors (the .gz file exactly as downloaded)."
        )

    try:
        with gzip.open(path, "rb") as f:
            header = f.read(header_size)
            if len(header) < header_size:
                raise fail(
                    f"only {len(header)} bytes after decompression, header needs {header_size}"
                )
            if kind == "images":
                magic, count, rows, cols = struct.unpack(">IIII", header)
                item_size = rows * cols
            else:
                magic, count = struct.unpack(">II", header)
                rows = cols = None
                item_size = 1
            want_magic = IDX_IMAGES_MAGIC if kind == "images" else IDX_LABELS_MAGIC
            if magic != want_magic:
                raise fail(f"magic number {magic}, expected {want_magic}")
            if kind == "images" and (rows, cols) != (MNIST_SIDE, MNIST_SIDE):
                raise fail(f"images are {rows}x{cols}, expected {MNIST_SIDE}x{MNIST_SIDE}")
            if expected_count is not None and count != expected_count:
                raise fail(f"it holds {count} items, expected {expected_count}")
            # Read the rest in chunks: checks the length and the gzip CRC without keeping it.
            data_len = 0
            while chunk := f.read(1 << 20):
                data_len += len(chunk)
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise fail(f"it does not decompress as gzip ({type(e).__name__}: {e})") from e
    if data_len != count * item_size:
        raise fail(
            f"header says {count} items ({count * item_size} data bytes) but the file has "
            f"{data_len} data bytes"
        )
    return count


def validate_manual_dir(name: str, manual_dir: str, files: tuple[SourceFile, ...]) -> None:
    """Structural checks of the (present) source files before tfds prepares from them.

    MNIST-family IDX files get the full IDX check (with the official counts); every file with
    a registered size must have exactly that size. tfds then verifies the SHA-256 itself.

    Raises:
      CorruptDatasetFileError naming the first bad file.
    """
    for f in files:
        path = os.path.join(manual_dir, f.filename)
        if name in IDX_DATASETS and f.filename in _IDX_FILES:
            kind, count = _IDX_FILES[f.filename]
            validate_idx_gz(path, kind, count)
        actual = os.path.getsize(path)
        if f.size is not None and actual != f.size:
            raise CorruptDatasetFileError(
                f"{path} has {actual} bytes but the original {f.filename} of {name} has "
                f"{f.size} bytes (tfds's registered checksums). Replace it with the original "
                f"file{f' from {f.url}' if f.url else ''}."
            )
