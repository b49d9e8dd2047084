"""Reading a diffusers model folder safely: config.json, the weights (safetensors, or a .bin
read with weights_only) and scheduler_config.json, as plain dicts.

This module owns the refusals of what is on disk: bad JSON, pickled code, corrupt files and
non-finite weights each raise one ValueError line naming the file and the fix. It does not
interpret the settings (pretrained_layout.py does) or download anything (pretrained.py does).
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch

from ddpm_core.messages import first_sentence, short

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
               type(None): "null"}


def _read_json(path: Path) -> dict:
    """The JSON object in `path`; a ValueError naming the file (and the line and column) otherwise."""
    try:
        data = json.loads(path.read_bytes())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); "
                         f"fix it or download it again") from error
    except (UnicodeDecodeError, RecursionError) as error:
        why = "not UTF-8 text" if isinstance(error, UnicodeDecodeError) else "nested too deeply"
        raise ValueError(f"{path} is not valid JSON ({why}); fix it or download it again") from error
    except OSError as error:
        raise ValueError(f"cannot read {path} ({error.strerror or type(error).__name__}); check its permissions") \
            from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds {_JSON_TYPES.get(type(data), 'a value')}, not a JSON object of settings; "
                         f"fix it or download it again")
    return data


def _unpickling_reason(error: pickle.UnpicklingError) -> str:
    """What torch's weights_only unpickler refused, in a few words (its own message spans many lines)."""
    text = str(error)
    call = re.search(r"GLOBAL (\S+) (was not an allowed global|whose module)", text)
    if call:
        return f"it would call {call.group(1)}"
    inner = text.split("\n\nCheck the documentation")[0].rsplit("\n\n", 1)[-1]  # torch's original message
    return first_sentence(inner.replace("WeightsUnpickler error:", "").strip() or "no details")


def _read_bin(path: Path):
    """torch.load(weights_only=True): tensors and plain data only, never pickled code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{path} refused: torch.load(weights_only=True) reads only tensors, and this file is a "
                         f"pickle that would run code or is corrupted ({_unpickling_reason(error)}); use the "
                         f"model's .safetensors weights instead") from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable PyTorch weights file (empty, truncated or corrupted: "
                         f"{first_sentence(error)}); download it again") from error


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, RuntimeError, OSError, ValueError, TypeError) as error:  # the Rust reader's errors vary
        raise ValueError(f"{path} is not a readable safetensors file (empty, truncated or corrupted: "
                         f"{first_sentence(error)}); download it again") from error


def _read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in `path` (safetensors, or a .bin read with weights_only=True); a ValueError
    naming the file if it cannot be read, is not a dict of named tensors, or holds NaN or inf."""
    path = Path(path)
    state = _read_safetensors(path) if path.suffix == ".safetensors" else _read_bin(path)
    if not isinstance(state, dict) or not state:
        what = "no weights" if isinstance(state, dict) else f"a {type(state).__name__}"
        raise ValueError(f"{path} holds {what}, not a state dict (weight names -> tensors); "
                         f"is it the model's diffusion_pytorch_model file?")
    for name, tensor in state.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{path} is not a state dict: entry {short(name)} is a {type(tensor).__name__}, "
                             f"not a tensor; is it the model's diffusion_pytorch_model file?")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            # a model with NaN weights would sample only NaN (black) images, silently
            raise ValueError(f"{path}: weight {name!r} holds NaN or infinite values; these weights are broken, "
                             f"download them again or use another checkpoint")
    return state


def read_diffusers_folder(folder: str | Path) -> tuple[dict, dict, dict | None]:
    """(UNet config, state dict, scheduler config or None) from a diffusers model folder.

    Accepts a UNet folder (config.json + weights) or a pipeline folder with unet/ and
    scheduler/ subfolders. Weights are read safely: safetensors, or a .bin with weights_only.
    Anything unreadable raises one ValueError line naming the file.
    """
    folder = Path(folder)
    if folder.is_file():
        raise ValueError(f"{folder} is a file; pass the folder that holds config.json and the weights")
    unet_dir = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
    if not (unet_dir / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {folder} (nor in {folder / 'unet'}): not a diffusers model folder")
    config = _read_json(unet_dir / "config.json")
    weights = next((unet_dir / name for name in WEIGHT_FILES if (unet_dir / name).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"no weights in {unet_dir}: expected one of {', '.join(WEIGHT_FILES)}")
    state = _read_weights(weights)
    candidates = (folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json")
    scheduler = next((_read_json(path) for path in candidates if path.is_file()), None)
    return config, state, scheduler
