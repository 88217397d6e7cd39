"""Getting a tfds dataset prepared, offline when possible, and reading splits into memory.

Order (never waits for a network timeout when avoidable):
  1. already prepared in `data_dir` -> use it;
  2. `manual_dir` given -> check every expected original file is there and well-formed, then
     `download_and_prepare(DownloadConfig(manual_dir=...))` (no network: tfds finds
     `manual_dir/<filename>` for each URL and verifies its SHA-256);
  3. otherwise a 3-second reachability probe of the download hosts; unreachable ->
     DatasetNotFoundError right away (tfds itself would retry for minutes), reachable ->
     download, with any failure converted to DatasetNotFoundError.
Never falls back to fake data.
"""

from __future__ import annotations

import collections
import os
import socket
import threading
import urllib.parse
from typing import Any

import numpy as np

from jaxvae.data import files as files_lib
from jaxvae.data import tf_support
from jaxvae.data.errors import CorruptDatasetFileError, DatasetNotFoundError

# Values of the stored pixels: binarized_mnist stores {0, 1}, everything else 0..255.
MAX_PIXEL_VALUE = {"binarized_mnist": 1}
_PROBE_TIMEOUT_S = 3.0
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def max_pixel_value(name: str) -> int:
    """Largest stored pixel value of dataset `name`."""
    return MAX_PIXEL_VALUE.get(name, 255)


def tfds_is_mocked() -> bool:
    """True inside `tfds.testing.mock_data`: preparation is a no-op and data are synthetic.

    There the offline checks (which look at real folders) are skipped and nothing is cached.
    """
    tfds = tf_support.import_tfds()
    fn = tfds.core.DatasetBuilder.download_and_prepare
    return getattr(fn, "__module__", "").startswith("tensorflow_datasets.testing")


def make_builder(name: str, data_dir: str | None) -> Any:
    """`tfds.builder(name, data_dir=...)`, with a clear ValueError for unknown names."""
    tfds = tf_support.import_tfds()
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(
            f"config.data.name={name!r} is not a tensorflow-datasets dataset name "
            "(e.g. 'mnist', 'fashion_mnist', 'binarized_mnist', 'cifar10', 'celeb_a')."
        ) from e


def _hosts(files: tuple[files_lib.SourceFile, ...]) -> list[tuple[str, int]]:
    out = []
    for f in files:
        if f.url:
            u = urllib.parse.urlparse(f.url)
            port = u.port or (443 if u.scheme == "https" else 80)
            if u.hostname and (u.hostname, port) not in out:
                out.append((u.hostname, port))
    return out


def network_reachable(hosts: list[tuple[str, int]], timeout_s: float = _PROBE_TIMEOUT_S) -> bool:
    """True when a TCP connection to every host opens within `timeout_s` (DNS included).

    Runs in a daemon thread because name resolution ignores socket timeouts.
    """
    if not hosts:
        return False
    result = {"ok": False}

    def probe() -> None:
        try:
            for host, port in hosts:
                socket.create_connection((host, port), timeout=timeout_s).close()
            result["ok"] = True
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout_s * (len(hosts) + 1))
    return result["ok"]


def _instructions(
    name: str,
    files: tuple[files_lib.SourceFile, ...],
    manual_dir: str | None,
    data_dir: str | None,
    missing: list[files_lib.SourceFile] | None = None,
) -> str:
    folder = manual_dir or f"/path/to/{name}"
    lines = []
    todo = missing if missing is not None else list(files)
    if todo:
        lines.append(f"Put these original files of {name} in the folder {folder}:")
        for f in todo:
            src = f" (from {f.url})" if f.url else ""
            lines.append(f"  {os.path.join(folder, f.filename)}{src}")
    else:
        lines.append(f"The original files of {name} are not known to tfds; see its catalog page.")
    lines.append(
        f"Then run with --config.data.manual_dir={folder} (tensorflow-datasets prepares "
        f"{name} from those files with no network, into "
        f"{data_dir or '~/tensorflow_datasets'} = config.data.data_dir)."
    )
    return "\n".join(lines)


def ensure_prepared(name: str, data_dir: str | None = None, manual_dir: str | None = None) -> Any:
    """Returns a tfds builder whose data are prepared (see module docstring for the order).

    Raises:
      DatasetNotFoundError (with instructions) when the data cannot be prepared;
      CorruptDatasetFileError naming a bad file in `manual_dir`.
    """
    tfds = tf_support.import_tfds()
    builder = make_builder(name, data_dir)
    if tfds_is_mocked():
        builder.download_and_prepare()  # a no-op under mock_data
        return builder
    if builder.is_prepared():
        return builder
    files = files_lib.expected_source_files(name, type(builder).url_infos)
    if manual_dir:
        manual_dir = os.path.expanduser(str(manual_dir))
        if not os.path.isdir(manual_dir):
            raise DatasetNotFoundError(
                f"config.data.manual_dir={manual_dir} is not a folder.\n"
                + _instructions(name, files, manual_dir, data_dir)
            )
        missing = files_lib.missing_files(manual_dir, files)
        if missing:
            raise DatasetNotFoundError(
                f"{name} is not prepared in {builder.data_dir} and config.data.manual_dir="
                f"{manual_dir} lacks {len(missing)} of its {len(files)} original files.\n"
                + _instructions(name, files, manual_dir, data_dir, missing)
            )
        files_lib.validate_manual_dir(name, manual_dir, files)
        config = tfds.download.DownloadConfig(manual_dir=manual_dir)
        how = f"from the files in {manual_dir}"
    else:
        # No known URLs: nothing to probe, tfds decides (e.g. datasets built from code).
        probe = bool(files) and not os.environ.keys() & set(_PROXY_VARS)
        if probe and not network_reachable(_hosts(files)):
            raise DatasetNotFoundError(
                f"{name} is not prepared in {builder.data_dir}, no config.data.manual_dir is "
                "set, and its download hosts are unreachable (offline?).\n"
                + _instructions(name, files, None, data_dir)
            )
        config = tfds.download.DownloadConfig()
        how = "by downloading it"
    from tensorflow_datasets.core.download.download_manager import NonMatchingChecksumError

    try:
        builder.download_and_prepare(download_config=config)
    except NonMatchingChecksumError as e:
        raise CorruptDatasetFileError(
            f"preparing {name} {how} failed: a file's SHA-256 differs from tfds's registered "
            f"checksum, so it is not the original file.\n{e}\n"
            + _instructions(name, files, manual_dir, data_dir)
        ) from e
    except (OSError, ValueError, RuntimeError) as e:  # network errors are OSErrors
        raise DatasetNotFoundError(
            f"preparing {name} {how} failed ({type(e).__name__}: {e}).\n"
            + _instructions(name, files, manual_dir, data_dir)
        ) from e
    return builder


def native_image_shape(builder: Any) -> tuple[int, int, int]:
    """(H, W, C) of the builder's "image" feature."""
    shape = tuple(builder.info.features["image"].shape)
    if len(shape) != 3 or any(s is None for s in shape):
        raise ValueError(f"{builder.name}: expected a fixed-size image feature, got {shape}")
    return shape  # type: ignore[return-value]


# Small LRU of loaded splits: the training program asks for the eval split at every evaluation.
_CACHE: collections.OrderedDict = collections.OrderedDict()
_CACHE_SIZE = 4


def clear_cache() -> None:
    """Forgets the splits loaded into memory."""
    _CACHE.clear()


def load_split(
    builder: Any, split: str, center_crop: int | None = None, image_size: int | None = None
) -> np.ndarray:
    """The whole split as a read-only uint8 array [N, H, W, C] (cropped/resized if asked).

    Read once through tf.data in chunks (tfds's `batch_size=-1` needs split sizes, which
    `mock_data` does not know).
    """
    key = (builder.name, str(builder.data_dir), split, center_crop, image_size)
    mocked = tfds_is_mocked()
    if not mocked and key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    tfds = tf_support.import_tfds()
    ds = builder.as_dataset(split=split, shuffle_files=False)
    if center_crop is None and image_size is None:
        ds = ds.map(lambda ex: ex["image"])
    else:
        ds = ds.map(lambda ex: tf_support.crop_resize(ex["image"], center_crop, image_size))
    chunks = [np.asarray(x) for x in tfds.as_numpy(ds.batch(8192))]
    h, w, c = tf_support.output_image_shape(native_image_shape(builder), center_crop, image_size)
    images = np.concatenate(chunks) if chunks else np.zeros((0, h, w, c), np.uint8)
    images = np.ascontiguousarray(images, dtype=np.uint8)
    images.flags.writeable = False
    if not mocked:
        _CACHE[key] = images
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return images
