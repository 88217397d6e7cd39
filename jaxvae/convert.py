"""Import a trained PyTorch-VAE ``VanillaVAE`` into ``jaxvae.models.VAE``.

Library::

    model, variables = load_pytorch_vanilla_vae(state_dict, image_size=64)
    outputs, mean, logvar = model.apply(variables, x_nhwc, key)

``state_dict`` maps PyTorch names to numpy arrays (``{k: v.numpy() for k, v in sd.items()}``).
Keys prefixed ``model.`` (a PyTorch-Lightning ``.ckpt``) are accepted; ``num_batches_tracked``
entries are ignored. ``hidden_dims``, ``latent_dim`` and the channel count are inferred from the
shapes. Missing, unexpected or wrongly shaped entries raise a ``ValueError`` naming them.

Command line (writes a jaxvae workdir: ``out_dir/config.json``, the seed's run with the
inferred model, and a step-0 checkpoint ``out_dir/checkpoints/0/``; see :func:`save_converted`)::

    python -m jaxvae.convert in.npz out_dir [--image-size 64]
    python -m jaxvae.convert last.ckpt out_dir   # needs torch installed (optional)
    python train.py --mode sample --workdir out_dir   # prior samples; no dataset needed

``jaxvae.inference.load_trained(config, out_dir)`` returns ``(model, variables, step)``.

Image size. A state_dict does not record the image size: ``fc_mu`` has
``in_features = C_last * b_h * b_w`` with ``(b_h, b_w)`` the encoder's final spatial shape, which
many image sizes share. The caller passes the training image size (default 64, the seed's; the
seed itself only works for 64x64, i.e. a 2x2 bottleneck with 5 levels) and the conversion checks
that it gives a bottleneck of ``b_h * b_w`` positions, or raises a ``ValueError`` saying which
bottleneck the checkpoint has.

Layout conversions (PyTorch -> Flax):
  Conv2d weight ``[O, I, kh, kw]`` -> kernel ``[kh, kw, I, O]``.
  ConvTranspose2d weight ``[I, O, kh, kw]`` (``I`` = its input channels) -> kernel
    ``[kh, kw, O, I]``: the ``transpose_kernel=True`` layout of ``jaxvae.layers``, no flip.
  Linear weight ``[out, in]`` -> kernel ``[in, out]``.
  Flatten order: PyTorch flattens the ``[C, b_h, b_w]`` feature map in (c, h, w) order, the Flax
    model (NHWC) in (h, w, c) order; the ``fc_mu``/``fc_var`` kernel rows and the
    ``decoder_input`` kernel columns and bias are permuted accordingly.
  BatchNorm ``weight, bias, running_mean, running_var`` -> ``scale, bias`` (params) and
    ``mean, var`` (batch_stats), unchanged: evaluation-mode outputs are identical.

BatchNorm running variance note: PyTorch updates ``running_var`` with the *unbiased* batch
variance (``n / (n - 1)`` times the biased one, ``n = batch * H * W`` per channel), Flax with the
biased one. Imported statistics are used as they are (exact for evaluation); if training continues
in jaxvae, new updates follow Flax's rule, a relative difference of ``1 / (n - 1)`` per update
(under 0.4% for the seed's batch 64 at its 2x2 bottleneck, far less at larger feature maps).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import sys
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxvae import checkpointing, config_utils, optim, paths, reporting, workdir_files
from jaxvae import train_state as ts
from jaxvae.models import VAE, bottleneck_shape

LIGHTNING_PREFIX = "model."
SEED_IMAGE_SIZE = 64

_BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var")


def vanilla_vae_state_dict_shapes(
    hidden_dims: Sequence[int],
    latent_dim: int,
    channels: int,
    bottleneck_hw: tuple[int, int],
) -> dict[str, tuple[int, ...]]:
    """PyTorch shapes of a VanillaVAE state_dict (``num_batches_tracked`` excluded)."""
    dims = tuple(hidden_dims)
    flat = dims[-1] * bottleneck_hw[0] * bottleneck_hw[1]
    shapes: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, c: int) -> None:
        shapes.update({f"{prefix}.{s}": (c,) for s in _BN_SUFFIXES})

    cin = channels
    for i, h in enumerate(dims):
        shapes[f"encoder.{i}.0.weight"] = (h, cin, 3, 3)
        shapes[f"encoder.{i}.0.bias"] = (h,)
        bn(f"encoder.{i}.1", h)
        cin = h
    for name in ("fc_mu", "fc_var"):
        shapes[f"{name}.weight"] = (latent_dim, flat)
        shapes[f"{name}.bias"] = (latent_dim,)
    shapes["decoder_input.weight"] = (flat, latent_dim)
    shapes["decoder_input.bias"] = (flat,)
    rev = dims[::-1]
    for i in range(len(rev) - 1):
        shapes[f"decoder.{i}.0.weight"] = (rev[i], rev[i + 1], 3, 3)
        shapes[f"decoder.{i}.0.bias"] = (rev[i + 1],)
        bn(f"decoder.{i}.1", rev[i + 1])
    shapes["final_layer.0.weight"] = (dims[0], dims[0], 3, 3)
    shapes["final_layer.0.bias"] = (dims[0],)
    bn("final_layer.1", dims[0])
    shapes["final_layer.3.weight"] = (channels, dims[0], 3, 3)
    shapes["final_layer.3.bias"] = (channels,)
    return shapes


def _normalize_keys(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Strips a Lightning ``model.`` prefix and drops ``num_batches_tracked``."""
    out: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        name = key[len(LIGHTNING_PREFIX) :] if key.startswith(LIGHTNING_PREFIX) else key
        if name.endswith("num_batches_tracked"):
            continue
        if name in out:
            raise ValueError(f"state_dict has {name!r} both with and without the 'model.' prefix")
        out[name] = np.asarray(value)
    return out


def _image_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"image_size must be an int or (H, W) of positive ints, got {image_size}")
    return int(hw[0]), int(hw[1])


def infer_config(
    state_dict: Mapping[str, Any], image_size: int | Sequence[int] = SEED_IMAGE_SIZE
) -> dict[str, Any]:
    """``{"hidden_dims", "latent_dim", "image_shape"}`` of a VanillaVAE state_dict.

    Only shapes are read; the full key/shape check is in :func:`load_pytorch_vanilla_vae`.
    """
    sd = _normalize_keys(state_dict)
    hidden_dims, cin = [], None
    while (key := f"encoder.{len(hidden_dims)}.0.weight") in sd:
        w = sd[key]
        if w.ndim != 4:
            raise ValueError(f"{key} must be a Conv2d weight [O, I, 3, 3], got shape {w.shape}")
        cin = w.shape[1] if cin is None else cin
        hidden_dims.append(int(w.shape[0]))
    if not hidden_dims:
        raise ValueError(
            "state_dict has no 'encoder.0.0.weight': not a PyTorch-VAE VanillaVAE state_dict "
            f"(first keys: {sorted(sd)[:5]})"
        )
    if "fc_mu.weight" not in sd or sd["fc_mu.weight"].ndim != 2:
        got = sd["fc_mu.weight"].shape if "fc_mu.weight" in sd else "missing"
        raise ValueError(f"state_dict key 'fc_mu.weight' must be a Linear weight, got {got}")
    latent_dim, flat = (int(s) for s in sd["fc_mu.weight"].shape)
    positions, rem = divmod(flat, hidden_dims[-1])
    if rem:
        raise ValueError(
            f"fc_mu.weight has in_features {flat}, not a multiple of the last hidden dim "
            f"{hidden_dims[-1]} (encoder.{len(hidden_dims) - 1}.0.weight)"
        )
    hw = _image_hw(image_size)
    b_hw = bottleneck_shape(hw, len(hidden_dims))
    if b_hw[0] * b_hw[1] != positions:
        side, scale = math.isqrt(positions), 2 ** len(hidden_dims)
        hint = (
            f" (square images of side {scale * (side - 1) + 1} to {scale * side} fit)"
            if side * side == positions
            else ""
        )
        raise ValueError(
            f"fc_mu.weight has in_features {flat} = {hidden_dims[-1]} channels x {positions} "
            f"bottleneck positions, but image size {hw[0]}x{hw[1]} with {len(hidden_dims)} "
            f"stride-2 levels gives a {b_hw[0]}x{b_hw[1]} bottleneck; pass the image size the "
            f"model was trained on (image_size= / --image-size){hint}"
        )
    return {
        "hidden_dims": tuple(hidden_dims),
        "latent_dim": latent_dim,
        "image_shape": (hw[0], hw[1], int(cin)),
    }


def _check_shapes(sd: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]]) -> None:
    missing = sorted(set(expected) - set(sd))
    extra = sorted(set(sd) - set(expected))
    wrong = [
        f"{k}: expected {expected[k]}, got {tuple(sd[k].shape)}"
        for k in expected
        if k in sd and tuple(sd[k].shape) != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if extra:
        problems.append(f"unexpected keys {extra}")
    if wrong:
        problems.append("wrong shapes: " + "; ".join(wrong))
    if problems:
        raise ValueError(
            "state_dict does not match a PyTorch-VAE VanillaVAE with the inferred config: "
            + " | ".join(problems)
        )


def _conv(w: np.ndarray) -> np.ndarray:
    return w.transpose(2, 3, 1, 0)  # [O, I, kh, kw] -> [kh, kw, I, O]


def _conv_transpose(w: np.ndarray) -> np.ndarray:
    return w.transpose(2, 3, 1, 0)  # [I, O, kh, kw] -> [kh, kw, O, I]


def load_pytorch_vanilla_vae(
    state_dict: Mapping[str, Any],
    image_size: int | Sequence[int] = SEED_IMAGE_SIZE,
    *,
    conv_impl: str = "auto",
    dtype: Any = jnp.float32,
) -> tuple[VAE, dict[str, Any]]:
    """PyTorch-VAE VanillaVAE state_dict -> ``(VAE, {"params", "batch_stats"})``.

    Args:
      state_dict: name -> array (numpy or anything ``np.asarray`` accepts); Lightning's
        ``model.`` prefix and ``num_batches_tracked`` entries are accepted.
      image_size: the training image side (int) or ``(H, W)``; see the module docstring.
      conv_impl, dtype: passed to :class:`jaxvae.models.VAE`.

    Returns:
      A Gaussian/tanh ``VAE`` (the seed's output layer) and its variables (float32).

    Raises:
      ValueError: a missing, unexpected or wrongly shaped key, or an image size that does not
        match ``fc_mu``'s input size.
    """
    config = infer_config(state_dict, image_size)
    sd = _normalize_keys(state_dict)
    dims, (height, width, channels) = config["hidden_dims"], config["image_shape"]
    b_h, b_w = bottleneck_shape((height, width), len(dims))
    _check_shapes(
        sd, vanilla_vae_state_dict_shapes(dims, config["latent_dim"], channels, (b_h, b_w))
    )
    f32 = {k: v.astype(np.float32) for k, v in sd.items()}
    c_last, latent = dims[-1], config["latent_dim"]

    def bn(prefix: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        params = {"scale": f32[f"{prefix}.weight"], "bias": f32[f"{prefix}.bias"]}
        stats = {"mean": f32[f"{prefix}.running_mean"], "var": f32[f"{prefix}.running_var"]}
        return params, stats

    def head(name: str) -> dict[str, np.ndarray]:
        # [D, (c, h, w)] -> [(h, w, c), D]
        w = f32[f"{name}.weight"].reshape(latent, c_last, b_h, b_w).transpose(2, 3, 1, 0)
        return {"kernel": w.reshape(-1, latent), "bias": f32[f"{name}.bias"]}

    enc_p: dict[str, Any] = {}
    enc_s: dict[str, Any] = {}
    for i in range(len(dims)):
        enc_p[f"conv_{i}"] = {
            "kernel": _conv(f32[f"encoder.{i}.0.weight"]),
            "bias": f32[f"encoder.{i}.0.bias"],
        }
        enc_p[f"bn_{i}"], enc_s[f"bn_{i}"] = bn(f"encoder.{i}.1")
    enc_p["fc_mu"], enc_p["fc_var"] = head("fc_mu"), head("fc_var")

    # [(c, h, w), D] -> [D, (h, w, c)]
    w_in = f32["decoder_input.weight"].reshape(c_last, b_h, b_w, latent).transpose(3, 1, 2, 0)
    b_in = f32["decoder_input.bias"].reshape(c_last, b_h, b_w).transpose(1, 2, 0)
    dec_p: dict[str, Any] = {
        "decoder_input": {"kernel": w_in.reshape(latent, -1), "bias": b_in.reshape(-1)}
    }
    dec_s: dict[str, Any] = {}
    for i in range(len(dims) - 1):
        dec_p[f"conv_transpose_{i}"] = {
            "kernel": _conv_transpose(f32[f"decoder.{i}.0.weight"]),
            "bias": f32[f"decoder.{i}.0.bias"],
        }
        dec_p[f"bn_{i}"], dec_s[f"bn_{i}"] = bn(f"decoder.{i}.1")
    dec_p["final_conv_transpose"] = {
        "kernel": _conv_transpose(f32["final_layer.0.weight"]),
        "bias": f32["final_layer.0.bias"],
    }
    dec_p["final_bn"], dec_s["final_bn"] = bn("final_layer.1")
    dec_p["final_conv"] = {
        "kernel": _conv(f32["final_layer.3.weight"]),
        "bias": f32["final_layer.3.bias"],
    }

    model = VAE(
        latent_dim=latent,
        hidden_dims=dims,
        image_shape=(height, width, channels),
        likelihood="gaussian",
        output_activation="tanh",
        conv_impl=conv_impl,
        dtype=dtype,
    )
    variables = {
        "params": {"encoder": enc_p, "decoder": dec_p},
        "batch_stats": {"encoder": enc_s, "decoder": dec_s},
    }
    _check_against_model(model, variables)
    return model, jax.tree.map(jnp.asarray, variables)


def _abstract_variables(model: VAE) -> Any:
    x = jax.ShapeDtypeStruct((1, *model.image_shape), jnp.float32)
    key = jax.random.key(0)
    return jax.eval_shape(lambda x: model.init({"params": key}, x, key, train=False), x)


def _check_against_model(model: VAE, variables: Mapping[str, Any]) -> None:
    """The converted tree must be exactly the model's (a bug here, not in the user's input)."""
    want = jax.tree.map(lambda a: tuple(a.shape), _abstract_variables(model))
    got = jax.tree.map(lambda a: tuple(a.shape), dict(variables))
    if want != got:
        raise AssertionError(f"converted variables do not match the model: {got} vs {want}")


# ---------------------------------------------------------------------------
# Files and command line
# ---------------------------------------------------------------------------


def read_state_dict(path: str | os.PathLike, *, trust_pickle: bool = False) -> dict[str, Any]:
    """Reads a state_dict from ``.npz`` (numpy only) or ``.ckpt``/``.pt``/``.pth`` (needs torch).

    A Lightning ``.ckpt`` is a dict with a ``state_dict`` entry; a ``.pt`` may be the state_dict
    itself. ``torch.load`` runs with ``weights_only=True`` unless ``trust_pickle``.
    """
    path = Path(path)
    if path.suffix == ".npz":
        # np.load reads anything that is not a zip archive as a pickle, and refuses it with a
        # message about pickled data: say what the file should be instead.
        if path.is_file() and not zipfile.is_zipfile(path):
            raise ValueError(
                f"{path} is not a .npz archive, or it is cut short; write one with "
                "`np.savez(path, **{k: v.numpy() for k, v in state_dict.items()})`"
            )
        try:
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except zipfile.BadZipFile as e:
            raise ValueError(f"{path} is a damaged .npz archive ({e})") from e
    if path.suffix not in (".ckpt", ".pt", ".pth"):
        raise ValueError(f"{path}: expected a .npz, .ckpt, .pt or .pth file")
    try:
        import torch  # optional: never a jaxvae dependency
    except ImportError:
        raise ValueError(
            f"reading {path.name} needs torch, which is not installed. Either `pip install torch` "
            "(CPU build is enough), or on a machine with torch write an .npz: "
            "`np.savez(out, **{k: v.numpy() for k, v in sd.items()})` with sd = "
            "torch.load(path, map_location='cpu')['state_dict'] (or the state_dict itself)"
        ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:  # torch raises UnpicklingError subclasses that vary by version
        raise ValueError(
            f"torch.load({path.name}, weights_only=True) failed ({type(e).__name__}: {e}). If "
            "you trust the file, rerun with --trust-pickle (runs its pickled code)."
        ) from e
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path.name} holds a {type(sd).__name__}, not a state_dict mapping")
    return {k: v.detach().cpu().numpy() if hasattr(v, "detach") else v for k, v in sd.items()}


def converted_config(model: VAE) -> ml_collections.ConfigDict:
    """The resolved jaxvae config of a converted model: :func:`~jaxvae.config_utils.base_config`
    with the seed's run (``configs/celeba.py``: CelebA center-cropped to 148, in [-1, 1],
    PyTorch-VAE's loss, its seed) and the converted model's fields (Gaussian likelihood, tanh
    output, latent and hidden dims, the image side as ``data.image_size``).

    Raises ``ValueError`` for a non-square image size (``data.image_size`` is one side).
    """
    height, width, _ = model.image_shape
    if height != width:
        raise ValueError(
            f"image size {height}x{width}: a jaxvae workdir holds square images "
            "(config.data.image_size is one side); convert with --image-size N"
        )
    config = config_utils.base_config()
    config.name = "celeba_converted"
    config.seed = 1265
    config.batch_size = 64
    config.objective = "vanilla_vae_loss"
    config.data.name = "celeb_a"
    config.data.binarize = "none"
    config.data.pixel_range = "symmetric"
    config.data.center_crop = 148
    config.data.image_size = height
    config.data.in_memory = False
    config.model.latent_dim = model.latent_dim
    config.model.hidden_dims = tuple(model.hidden_dims)
    config.model.likelihood = model.likelihood
    config.model.output_activation = model.output_activation
    return config


def save_converted(out_dir: str | os.PathLike, model: VAE, variables: Any) -> Path:
    """Writes a jaxvae workdir holding the converted model: ``config.json``
    (:func:`converted_config`) and ``checkpoints/0/``, a step-0 checkpoint written the way
    training writes its own (the variables, a fresh optimizer state, no data position).

    ``python train.py --mode sample|eval --workdir out_dir`` and
    :func:`jaxvae.inference.load_trained` read it; training in it fine-tunes from the converted
    variables. Raises ``ValueError`` when ``out_dir`` already holds a run or cannot be written;
    nothing is written then, and nothing is left behind when the writing fails or is
    interrupted (the folders it made and what it wrote in them are removed again).
    """
    out = Path(out_dir).absolute()
    held = [out / n for n in (workdir_files.CONFIG, "checkpoints") if (out / n).exists()]
    if held:
        raise ValueError(
            f"{out} already holds a run ({', '.join(p.name for p in held)}); nothing was "
            "written. Convert into a fresh folder."
        )
    reason = paths.not_writable_reason(out)
    if reason is not None:
        raise ValueError(f"cannot write {out}: {reason}. Choose another output folder.")
    config = converted_config(model)
    tx, _ = optim.create_optimizer(config.optimizer, 1, 1)  # its schedule shapes no state
    params, batch_stats = variables["params"], variables["batch_stats"]
    fresh = ts.init_train_state(model, tx, config.seed)  # the step, the noise key
    state = fresh.replace(params=params, batch_stats=batch_stats, opt_state=tx.init(params))
    made = paths.make_folder(out)
    try:
        manager = checkpointing.create_manager(out / "checkpoints", config.keep_checkpoints)
        try:
            checkpointing.save(manager, 0, state, {})
        finally:
            checkpointing.close(manager)
        reporting.write_json(out / workdir_files.CONFIG, config_utils.to_dict(config))
    except BaseException as e:  # a failed write, or Ctrl-C: leave no half-written workdir behind
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        (out / workdir_files.CONFIG).unlink(missing_ok=True)
        paths.remove_if_empty(made)
        if isinstance(e, checkpointing.CheckpointWriteError):
            raise checkpointing.CheckpointWriteError(
                f"could not write the converted model in {out}: {checkpointing.root_cause(e)}. "
                "Nothing was left there; make room or fix the folder's permissions, then run "
                "the same command again."
            ) from e
        raise
    return out


def _parse_image_size(text: str) -> int | tuple[int, int]:
    m = re.fullmatch(r"(\d+)(?:x(\d+))?", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"--image-size must be N or HxW, got {text!r}")
    return int(m[1]) if m[2] is None else (int(m[1]), int(m[2]))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m jaxvae.convert",
        description="Convert a PyTorch-VAE VanillaVAE state_dict to a jaxvae checkpoint.",
    )
    parser.add_argument("input", help="state_dict as .npz, or a .ckpt/.pt/.pth (needs torch)")
    parser.add_argument(
        "out_dir", help="the jaxvae workdir to write (config.json and checkpoints/0/)"
    )
    parser.add_argument(
        "--image-size",
        type=_parse_image_size,
        default=SEED_IMAGE_SIZE,
        help="training image size, N or HxW (default 64, the seed's); not stored in a state_dict",
    )
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="torch.load with weights_only=False (only for files you trust)",
    )
    args = parser.parse_args(argv)
    checkpointing.hide_orbax_logs()  # its warnings about the metric-less step-0 checkpoint
    try:
        state_dict = read_state_dict(args.input, trust_pickle=args.trust_pickle)
        model, variables = load_pytorch_vanilla_vae(state_dict, args.image_size)
        out = save_converted(args.out_dir, model, variables)
    except (ValueError, OSError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    except checkpointing.CheckpointWriteError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr, flush=True)
        os._exit(1)  # orbax's threads of the failed save would hold the interpreter's exit
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted; nothing was written.", file=sys.stderr, flush=True)
        os._exit(130)  # a normal exit with orbax's or XLA's threads at work can crash (139)
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables["params"]))
    print(
        f"converted {args.input}: hidden_dims={model.hidden_dims} latent_dim={model.latent_dim} "
        f"image_shape={model.image_shape} ({n} parameters) -> {out}\n"
        f"sample it: python train.py --mode sample --workdir {out}"
    )


__all__ = [
    "SEED_IMAGE_SIZE",
    "converted_config",
    "infer_config",
    "load_pytorch_vanilla_vae",
    "read_state_dict",
    "save_converted",
    "vanilla_vae_state_dict_shapes",
]


if __name__ == "__main__":
    main()
