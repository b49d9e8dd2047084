"""Import the authors' released weights: diffusers' `UNet2DModel` in the DDPM layout
(e.g. `google/ddpm-cifar10-32`, converted from Ho et al.'s TensorFlow checkpoint) into our UNet.

This module owns the import as a whole: downloading a Hub repository with huggingface_hub (a
local folder needs no network), loading the converted weights into our UNet, and writing an
ordinary ddpm_core checkpoint, never over an existing one unless asked to. Its parts live in
pretrained_files.py (reading a folder safely: bad JSON, pickled code, corrupt or non-finite
weights are refused with one line naming the file) and pretrained_layout.py (the mapping of
configs and weight names between the two layouts); their public names are importable from here.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ddpm_core.checkpoint import Checkpoint, save_checkpoint
from ddpm_core.config import ModelConfig
from ddpm_core.files import check_output
from ddpm_core.pretrained_files import WEIGHT_FILES, read_diffusers_folder
from ddpm_core.pretrained_layout import (
    DDPM_LAYOUT,
    DOWN_BLOCKS,
    UP_BLOCKS,
    convert_diffusers_state_dict,
    diffusion_config_from_diffusers,
    model_config_from_diffusers,
)
from ddpm_core.unet import UNet

__all__ = [
    "DDPM_LAYOUT",
    "DOWN_BLOCKS",
    "UP_BLOCKS",
    "WEIGHT_FILES",
    "DownloadError",
    "convert_diffusers_state_dict",
    "diffusion_config_from_diffusers",
    "download",
    "import_pretrained",
    "model_config_from_diffusers",
    "read_diffusers_folder",
]

log = logging.getLogger(__name__)


class DownloadError(ConnectionError):
    """The Hub could not be reached (offline, no such repository); the message says what to do."""


def download(repo_id: str, cache_dir: str | Path | None = None) -> Path:
    """Fetch a model repository from the Hugging Face Hub; a clear error when offline."""
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "**/*.json", "**/*.safetensors"]
        return Path(snapshot_download(repo_id, cache_dir=cache_dir, allow_patterns=patterns))
    except Exception as error:  # network, offline mode, missing repository: all end here
        raise DownloadError(
            f"could not download {repo_id!r} from the Hugging Face Hub ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no details'}). Without internet, copy the "
            f"repository's config.json and diffusion_pytorch_model.safetensors (and scheduler_config.json) "
            f"into a folder on this machine and pass that folder instead."
        ) from error


def _load_converted(model: UNet, state: dict, config: ModelConfig, source) -> None:
    """Load diffusers' `state` into `model`; a ValueError naming `source` and the first weight
    that does not fit (rather than load_state_dict's many-line RuntimeError)."""
    try:
        converted = convert_diffusers_state_dict(state, config)
    except ValueError as error:
        raise ValueError(f"{source}: {error}; the weights and config.json do not belong together") from error
    expected = model.state_dict()
    for name, tensor in expected.items():
        if name not in converted:
            raise ValueError(f"{source}: the weights have no {name!r}, which the layout in config.json needs; "
                             f"the weights and config.json do not belong together")
        if converted[name].shape != tensor.shape:
            raise ValueError(f"{source}: weight {name!r} has shape {tuple(converted[name].shape)}, but the layout "
                             f"in config.json needs {tuple(tensor.shape)}; the weights and config.json do not "
                             f"belong together")
    extra = sorted(set(converted) - set(expected))
    if extra:
        raise ValueError(f"{source}: the weights have {extra[0]!r}, which the layout in config.json does not use; "
                         f"the weights and config.json do not belong together")
    model.load_state_dict(converted)


def import_pretrained(
    source: str | Path, out: str | Path, cache_dir: str | Path | None = None, force: bool = False
) -> Checkpoint:
    """Convert a diffusers DDPM UNet (a local folder, or a Hub repository id) into a ddpm_core
    checkpoint at `out`. The imported weights are stored as the EMA weights too, since the
    released ones are EMA weights.

    An existing `out` is kept (FileExistsError) unless `force`; an `out` that cannot be written
    (OutputError) is refused before anything is downloaded or converted.
    """
    out = check_output(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it, or choose another --out")
    folder = Path(source) if Path(source).exists() else download(str(source), cache_dir)
    config_dict, state, scheduler = read_diffusers_folder(folder)
    model_config = model_config_from_diffusers(config_dict)
    diffusion_config = diffusion_config_from_diffusers(scheduler)
    model = UNet(model_config)
    _load_converted(model, state, model_config, source)
    weights = model.state_dict()
    checkpoint = Checkpoint(
        model_config=model_config,
        diffusion_config=diffusion_config,
        model_state=weights,
        ema_state=weights,
        metadata={"source": str(source), "imported_from": "diffusers UNet2DModel"},
    )
    save_checkpoint(checkpoint, out)
    log.info("imported %s into %s", source, out)
    return checkpoint
