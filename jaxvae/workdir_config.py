"""A config file for ``--config``: the config a workdir was trained with (its ``config.json``).

``python train.py --mode eval --workdir W --config.eval.iwae_samples=5000`` (no ``--config``)
runs as ``--config=jaxvae/workdir_config.py:W``, which ``jaxvae.cli.parse_flags`` adds after
checking the file and the overrides; ml_collections then applies the overrides as usual.
"""

from __future__ import annotations

import ml_collections

from jaxvae import config_utils, workdir_files


def get_config(workdir: str) -> ml_collections.ConfigDict:
    saved = workdir_files.read_config(workdir)
    if saved is None:
        raise config_utils.ConfigError(f"--workdir {workdir} holds no {workdir_files.CONFIG}.")
    return config_utils.from_dict(saved)
