"""The DDPM layout of diffusers' UNet2DModel, mapped onto ours: its config.json -> ModelConfig,
its scheduler_config.json -> DiffusionConfig, its state dict -> our UNet's weight names and shapes.

This module owns that mapping, and the checks that a config is in the layout (a ValueError
naming the key and what it must be); it reads no files (pretrained_files.py does) and writes no
checkpoint (pretrained.py does).
"""

from __future__ import annotations

import math

import torch

from ddpm_core.config import DiffusionConfig, ModelConfig
from ddpm_core.messages import first_sentence, short

# Settings under which diffusers' UNet2DModel computes exactly what Ho et al.'s network does.
DDPM_LAYOUT = {
    "act_fn": "silu",
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
DOWN_BLOCKS, UP_BLOCKS = ("DownBlock2D", "AttnDownBlock2D"), ("UpBlock2D", "AttnUpBlock2D")
_REQUIRED = object()  # marks a config key without a default


# ---- config.json and scheduler_config.json -> our configs


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
        raise ValueError(f"{file}: {key!r} must be {expected}, got {short(value)}; fix that entry")
    return value


def _check_layout(config: dict) -> None:
    """Refuse a model other than UNet2DModel, or settings other than the DDPM layout's."""
    if not isinstance(config, dict):
        raise ValueError(f"a UNet2DModel config is a dict (config.json's object), not {type(config).__name__}")
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(f"only UNet2DModel can be imported, not {short(config['_class_name'])}")
    for key, expected in DDPM_LAYOUT.items():
        if config.get(key, expected) != expected:
            raise ValueError(
                f"unsupported UNet2DModel layout: {key}={short(config[key])}, but the DDPM layout needs {expected!r}"
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
        raise ValueError(f"attention_head_dim={short(head_dim)}: only single-head attention "
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
        norm_groups=_setting(config, "norm_num_groups", _positive_int, "a positive integer", "config.json", 32),
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


# ---- diffusers' state dict -> ours. Each helper pops the weights it converts from `state`
# (diffusers' names) into `out` (ours); a name absent from `state` raises KeyError.


def _take(state: dict, out: dict, ours: str, theirs: str) -> None:
    """A layer whose weight and bias only change names."""
    for suffix in ("weight", "bias"):
        out[f"{ours}.{suffix}"] = state.pop(f"{theirs}.{suffix}")


def _resnet(state: dict, out: dict, ours: str, theirs: str) -> None:
    """A residual block: norms, convs, the time-embedding projection, and a 1x1 shortcut if any."""
    for a, b in (("norm1", "norm1"), ("conv1", "conv1"), ("temb_proj", "time_emb_proj"),
                 ("norm2", "norm2"), ("conv2", "conv2")):
        _take(state, out, f"{ours}.{a}", f"{theirs}.{b}")
    if f"{theirs}.conv_shortcut.weight" in state:
        _take(state, out, f"{ours}.shortcut", f"{theirs}.conv_shortcut")


def _attention(state: dict, out: dict, ours: str, theirs: str, channels: int) -> None:
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
                         f"{channels} channels wide ({first_sentence(error)})") from error
    out[f"{ours}.proj_out.bias"] = state.pop(f"{theirs}.{o}.bias")


def _down_path(state: dict, out: dict, config: ModelConfig, widths: list[int], attn: list[bool]) -> None:
    """down_blocks.i -> down.i: resnets (with attention where the level has it), then a downsampler."""
    for i in range(len(widths)):
        for j in range(config.num_res_blocks):
            _resnet(state, out, f"down.{i}.blocks.{j}", f"down_blocks.{i}.resnets.{j}")
            if attn[i]:
                _attention(state, out, f"down.{i}.attns.{j}", f"down_blocks.{i}.attentions.{j}", widths[i])
        if i != len(widths) - 1:
            _take(state, out, f"down.{i}.resample.conv", f"down_blocks.{i}.downsamplers.0.conv")


def _up_path(state: dict, out: dict, config: ModelConfig, widths: list[int], attn: list[bool]) -> None:
    """up_blocks.k -> up.k: one resnet more than on the way down, then an upsampler."""
    last = len(widths) - 1
    for k in range(len(widths)):  # up_blocks[0] is the deepest level, as is our up[0]
        level = last - k
        for j in range(config.num_res_blocks + 1):
            _resnet(state, out, f"up.{k}.blocks.{j}", f"up_blocks.{k}.resnets.{j}")
            if attn[level]:
                _attention(state, out, f"up.{k}.attns.{j}", f"up_blocks.{k}.attentions.{j}", widths[level])
        if level != 0:
            _take(state, out, f"up.{k}.resample.conv", f"up_blocks.{k}.upsamplers.0.conv")


def convert_diffusers_state_dict(state_dict: dict, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename (and reshape, for attention) a diffusers DDPM-layout state dict into ours."""
    state, out = dict(state_dict), {}
    widths = [config.base_channels * m for m in config.channel_mults]
    attn = [config.attention and res in config.attention_resolutions for res in config.resolutions]
    try:
        _take(state, out, "temb.linear_1", "time_embedding.linear_1")
        _take(state, out, "temb.linear_2", "time_embedding.linear_2")
        _take(state, out, "conv_in", "conv_in")
        _down_path(state, out, config, widths, attn)
        _resnet(state, out, "mid_block1", "mid_block.resnets.0")
        _attention(state, out, "mid_attn", "mid_block.attentions.0", widths[-1])
        _resnet(state, out, "mid_block2", "mid_block.resnets.1")
        _up_path(state, out, config, widths, attn)
        _take(state, out, "norm_out", "conv_norm_out")
        _take(state, out, "conv_out", "conv_out")
    except KeyError as missing:
        raise ValueError(f"the state dict does not fit its config: missing {missing}") from None
    if state:
        raise ValueError(f"the state dict has weights the DDPM layout does not use: {sorted(state)[:5]}")
    return out
