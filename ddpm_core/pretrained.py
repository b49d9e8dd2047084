"""Import the authors' released weights: diffusers' `UNet2DModel` in the DDPM layout
(e.g. `google/ddpm-cifar10-32`, converted from Ho et al.'s TensorFlow checkpoint) into our UNet.

This module owns the mapping of names and configs between the two layouts, reading a local
folder (safely: bad JSON, pickled code, corrupt or non-finite weights are refused with one line
naming the file), and downloading one with huggingface_hub; it writes an ordinary ddpm_core
checkpoint, and never over an existing one unless asked to.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import re
from pathlib import Path

import torch

from ddpm_core.checkpoint import Checkpoint, first_line, save_checkpoint
from ddpm_core.config import DiffusionConfig, ModelConfig
from ddpm_core.files import check_output
from ddpm_core.unet import UNet

log = logging.getLogger(__name__)

# Settings under which diffusers' UNet2DModel computes exactly what Ho et al.'s network does.
DDPM_LAYOUT = {
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-6,
    "downsample_padding": 0,  # TF's "SAME" padding for the stride-2 convolution
    "flip_sin_to_cos": False,  # [sin, cos]
    "freq_shift": 1,  # frequencies divided by half - 1
    "time_embedding_type": "positional",
    "center_input_sample": False,
    "mid_block_scale_factor": 1,
    "resnet_time_scale_shift": "default",
    "class_embed_type": None,
    "num_class_embeds": None,
    "add_attention": True,
}
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
DOWN_BLOCKS, UP_BLOCKS = ("DownBlock2D", "AttnDownBlock2D"), ("UpBlock2D", "AttnUpBlock2D")
_REQUIRED = object()  # marks a config key without a default


class DownloadError(ConnectionError):
    """The Hub could not be reached (offline, no such repository); the message says what to do."""


def _short(value) -> str:
    """repr(value), cut to one short line for an error message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _first_line(error: BaseException | str) -> str:
    """`checkpoint.first_line`, cut short: error messages here are one line."""
    line = first_line(error)
    if len(line) > 160:  # a long message: its first sentence, or its start
        line = line.split(". ")[0] if len(line.split(". ")[0]) <= 160 else line[:157] + "..."
    return line


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not a size


def _positive_int(value) -> bool:
    return _is_int(value) and value > 0


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _list_of(check):
    return lambda value: isinstance(value, (list, tuple)) and len(value) > 0 and all(map(check, value))


def _setting(config: dict, key: str, valid, expected: str, file: str, default=_REQUIRED):
    """config[key] if valid(config[key]); a ValueError naming `file`, the key and what it must be otherwise."""
    if key not in config:
        if default is _REQUIRED:
            raise ValueError(f"{file} has no {key!r}, which a DDPM-layout {file} needs; add it "
                             f"(diffusers' save_pretrained writes it)")
        return default
    value = config[key]
    if not valid(value):
        raise ValueError(f"{file}: {key!r} must be {expected}, got {_short(value)}; fix that entry")
    return value


def _check_layout(config: dict) -> None:
    """Refuse a model other than UNet2DModel, or settings other than the DDPM layout's."""
    if not isinstance(config, dict):
        raise ValueError(f"a UNet2DModel config is a dict (config.json's object), not {type(config).__name__}")
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(f"only UNet2DModel can be imported, not {_short(config['_class_name'])}")
    for key, expected in DDPM_LAYOUT.items():
        if config.get(key, expected) != expected:
            raise ValueError(
                f"unsupported UNet2DModel layout: {key}={_short(config[key])}, but the DDPM layout needs {expected!r}"
            )


def _levels(config: dict) -> tuple[list[int], list[bool]]:
    """(block_out_channels, whether each level has attention), checked against the block types."""
    widths = list(_setting(config, "block_out_channels", _list_of(_positive_int),
                           "a list of positive integers", "config.json"))
    names = _list_of(lambda kind: isinstance(kind, str))
    down = list(_setting(config, "down_block_types", names, "a list of block type names", "config.json"))
    up = list(_setting(config, "up_block_types", names, "a list of block type names", "config.json"))
    if not set(down) <= set(DOWN_BLOCKS) or not set(up) <= set(UP_BLOCKS):
        raise ValueError(f"unsupported block types {down} / {up}: only (Attn)DownBlock2D and (Attn)UpBlock2D")
    if not len(down) == len(up) == len(widths):
        raise ValueError(f"config.json: block_out_channels, down_block_types and up_block_types need one entry "
                         f"per level, got {len(widths)}, {len(down)} and {len(up)}; make their lengths match")
    attn = [kind == "AttnDownBlock2D" for kind in down]
    if [kind == "AttnUpBlock2D" for kind in reversed(up)] != attn:
        raise ValueError("attention in up_block_types must mirror down_block_types")
    if any(w % widths[0] for w in widths):
        raise ValueError(f"block_out_channels {widths} must be multiples of the first")
    head_dim = config.get("attention_head_dim")
    if head_dim is not None and any(a and head_dim != w for a, w in zip(attn, widths)):
        raise ValueError(f"attention_head_dim={_short(head_dim)}: only single-head attention "
                         f"(head_dim = channels) is supported")
    return widths, attn


def _image_size(config: dict) -> int:
    """sample_size, an integer or a square [size, size]."""
    size = _setting(config, "sample_size", lambda s: _positive_int(s) or _list_of(_positive_int)(s),
                    "a positive integer (or [size, size])", "config.json")
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"config.json: 'sample_size' {list(size)} is not square; only square images are supported")
        size = size[0]
    return size


def model_config_from_diffusers(config: dict, dropout: float = 0.0) -> ModelConfig:
    """Our ModelConfig for a diffusers UNet2DModel config; ValueError (naming the key) if the layout
    differs, a needed key is missing or a value has the wrong type.

    Dropout is not part of diffusers' config file; it only matters for further training.
    """
    _check_layout(config)
    widths, attn = _levels(config)
    channels = _setting(config, "in_channels", _positive_int, "a positive integer", "config.json")
    if _setting(config, "out_channels", _positive_int, "a positive integer", "config.json", channels) != channels:
        raise ValueError("out_channels must equal in_channels (an eps-prediction model)")
    size = _image_size(config)
    return ModelConfig(
        kind="unet",
        image_size=size,
        in_channels=channels,
        base_channels=widths[0],
        channel_mults=tuple(w // widths[0] for w in widths),
        num_res_blocks=_setting(config, "layers_per_block", _positive_int, "a positive integer", "config.json"),
        attention=True,  # add_attention: the middle block always has attention
        attention_resolutions=tuple(size // 2**level for level, a in enumerate(attn) if a),
        dropout=dropout,
    )


def diffusion_config_from_diffusers(scheduler: dict | None) -> DiffusionConfig:
    """DiffusionConfig for a diffusers DDPMScheduler config (linear 1e-4..0.02, or cosine);
    ValueError (naming the key) for another schedule or a value of the wrong type."""
    if scheduler is None:
        return DiffusionConfig("linear", 1000)
    if not isinstance(scheduler, dict):
        raise ValueError(f"a DDPMScheduler config is a dict (scheduler_config.json's object), "
                         f"not {type(scheduler).__name__}")
    file, names = "scheduler_config.json", {"linear": "linear", "squaredcos_cap_v2": "cosine"}
    name = _setting(scheduler, "beta_schedule", lambda n: isinstance(n, str), "a string", file, "linear")
    if name not in names or scheduler.get("trained_betas") is not None:
        raise ValueError(f"unsupported beta schedule {name!r}; supported: {', '.join(names)}")
    T = _setting(scheduler, "num_train_timesteps", lambda n: _is_int(n) and n >= 2, "an integer of at least 2",
                 file, 1000)
    if names[name] == "linear":
        scale = 1000 / T  # our linear schedule at T scales the paper's ends by 1000 / T
        ends = tuple(_setting(scheduler, key, _number, "a number", file, default)
                     for key, default in (("beta_start", 1e-4), ("beta_end", 0.02)))
        if abs(ends[0] - 1e-4 * scale) > 1e-9 or abs(ends[1] - 0.02 * scale) > 1e-9:
            raise ValueError(f"linear betas {ends} differ from the paper's (1e-4, 0.02) at T = {T}")
    return DiffusionConfig(names[name], T)


def _attention(ours: str, theirs: str, state: dict, out: dict, channels: int) -> None:
    """q, k, v, out projections (Linear, old or new diffusers names) -> our 1x1 convs."""
    new = f"{theirs}.to_q.weight" in state
    q, k, v, o = ("to_q", "to_k", "to_v", "to_out.0") if new else ("query", "key", "value", "proj_attn")
    out[f"{ours}.norm.weight"] = state.pop(f"{theirs}.group_norm.weight")
    out[f"{ours}.norm.bias"] = state.pop(f"{theirs}.group_norm.bias")
    try:
        weights = [state.pop(f"{theirs}.{name}.weight") for name in (q, k, v)]
        out[f"{ours}.qkv.weight"] = torch.cat(weights).view(3 * channels, channels, 1, 1)
        out[f"{ours}.qkv.bias"] = torch.cat([state.pop(f"{theirs}.{name}.bias") for name in (q, k, v)])
        out[f"{ours}.proj_out.weight"] = state.pop(f"{theirs}.{o}.weight").view(channels, channels, 1, 1)
    except RuntimeError as error:  # cat / view of weights with the wrong shapes
        raise ValueError(f"the state dict does not fit its config: the attention weights {theirs}.* are not "
                         f"{channels} channels wide ({_first_line(error)})") from error
    out[f"{ours}.proj_out.bias"] = state.pop(f"{theirs}.{o}.bias")


def convert_diffusers_state_dict(state_dict: dict, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename (and reshape, for attention) a diffusers DDPM-layout state dict into ours."""
    state, out = dict(state_dict), {}

    def take(ours: str, theirs: str) -> None:
        for suffix in ("weight", "bias"):
            out[f"{ours}.{suffix}"] = state.pop(f"{theirs}.{suffix}")

    def resnet(ours: str, theirs: str) -> None:
        for a, b in (("norm1", "norm1"), ("conv1", "conv1"), ("temb_proj", "time_emb_proj"),
                     ("norm2", "norm2"), ("conv2", "conv2")):
            take(f"{ours}.{a}", f"{theirs}.{b}")
        if f"{theirs}.conv_shortcut.weight" in state:
            take(f"{ours}.shortcut", f"{theirs}.conv_shortcut")

    widths = [config.base_channels * m for m in config.channel_mults]
    attn = [config.attention and res in config.attention_resolutions for res in config.resolutions]
    last = len(widths) - 1
    try:
        take("temb.linear_1", "time_embedding.linear_1")
        take("temb.linear_2", "time_embedding.linear_2")
        take("conv_in", "conv_in")
        for i in range(len(widths)):
            for j in range(config.num_res_blocks):
                resnet(f"down.{i}.blocks.{j}", f"down_blocks.{i}.resnets.{j}")
                if attn[i]:
                    _attention(f"down.{i}.attns.{j}", f"down_blocks.{i}.attentions.{j}", state, out, widths[i])
            if i != last:
                take(f"down.{i}.resample.conv", f"down_blocks.{i}.downsamplers.0.conv")
        resnet("mid_block1", "mid_block.resnets.0")
        _attention("mid_attn", "mid_block.attentions.0", state, out, widths[-1])
        resnet("mid_block2", "mid_block.resnets.1")
        for k in range(len(widths)):  # up_blocks[0] is the deepest level, as is our up[0]
            level = last - k
            for j in range(config.num_res_blocks + 1):
                resnet(f"up.{k}.blocks.{j}", f"up_blocks.{k}.resnets.{j}")
                if attn[level]:
                    _attention(f"up.{k}.attns.{j}", f"up_blocks.{k}.attentions.{j}", state, out, widths[level])
            if level != 0:
                take(f"up.{k}.resample.conv", f"up_blocks.{k}.upsamplers.0.conv")
        take("norm_out", "conv_norm_out")
        take("conv_out", "conv_out")
    except KeyError as missing:
        raise ValueError(f"the state dict does not fit its config: missing {missing}") from None
    if state:
        raise ValueError(f"the state dict has weights the DDPM layout does not use: {sorted(state)[:5]}")
    return out


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
    return _first_line(inner.replace("WeightsUnpickler error:", "").strip() or "no details")


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
                         f"{_first_line(error)}); download it again") from error


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, RuntimeError, OSError, ValueError, TypeError) as error:  # the Rust reader's errors vary
        raise ValueError(f"{path} is not a readable safetensors file (empty, truncated or corrupted: "
                         f"{_first_line(error)}); download it again") from error


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
            raise ValueError(f"{path} is not a state dict: entry {_short(name)} is a {type(tensor).__name__}, "
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
