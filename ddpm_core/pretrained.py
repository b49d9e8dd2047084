"""Import the authors' released weights: diffusers' `UNet2DModel` in the DDPM layout
(e.g. `google/ddpm-cifar10-32`, converted from Ho et al.'s TensorFlow checkpoint) into our UNet.

This module owns the mapping of names and configs between the two layouts, reading a local
folder, and downloading one with huggingface_hub; it writes an ordinary ddpm_core checkpoint.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ddpm_core.checkpoint import Checkpoint, save_checkpoint
from ddpm_core.config import DiffusionConfig, ModelConfig
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


class DownloadError(ConnectionError):
    """The Hub could not be reached (offline, no such repository); the message says what to do."""


def model_config_from_diffusers(config: dict, dropout: float = 0.0) -> ModelConfig:
    """Our ModelConfig for a diffusers UNet2DModel config; ValueError if the layout differs.

    Dropout is not part of diffusers' config file; it only matters for further training.
    """
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(f"only UNet2DModel can be imported, not {config['_class_name']}")
    for key, expected in DDPM_LAYOUT.items():
        if config.get(key, expected) != expected:
            raise ValueError(
                f"unsupported UNet2DModel layout: {key}={config[key]!r}, but the DDPM layout needs {expected!r}"
            )
    widths = list(config["block_out_channels"])
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    allowed = {"DownBlock2D", "AttnDownBlock2D"}
    if not set(down) <= allowed or not set(up) <= {"UpBlock2D", "AttnUpBlock2D"}:
        raise ValueError(f"unsupported block types {down} / {up}: only (Attn)DownBlock2D and (Attn)UpBlock2D")
    attn = [kind == "AttnDownBlock2D" for kind in down]
    if [kind == "AttnUpBlock2D" for kind in reversed(up)] != attn:
        raise ValueError("attention in up_block_types must mirror down_block_types")
    if any(w % widths[0] for w in widths):
        raise ValueError(f"block_out_channels {widths} must be multiples of the first")
    head_dim = config.get("attention_head_dim")
    if head_dim is not None and any(a and head_dim != w for a, w in zip(attn, widths)):
        raise ValueError(f"attention_head_dim={head_dim}: only single-head attention (head_dim = channels) is supported")
    if config.get("out_channels", config["in_channels"]) != config["in_channels"]:
        raise ValueError("out_channels must equal in_channels (an eps-prediction model)")
    size = config["sample_size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    return ModelConfig(
        kind="unet",
        image_size=size,
        in_channels=config["in_channels"],
        base_channels=widths[0],
        channel_mults=tuple(w // widths[0] for w in widths),
        num_res_blocks=config["layers_per_block"],
        attention=True,  # add_attention: the middle block always has attention
        attention_resolutions=tuple(size // 2**level for level, a in enumerate(attn) if a),
        dropout=dropout,
    )


def diffusion_config_from_diffusers(scheduler: dict | None) -> DiffusionConfig:
    """DiffusionConfig for a diffusers DDPMScheduler config (linear 1e-4..0.02, or cosine)."""
    if scheduler is None:
        return DiffusionConfig("linear", 1000)
    names = {"linear": "linear", "squaredcos_cap_v2": "cosine"}
    name = scheduler.get("beta_schedule", "linear")
    if name not in names or scheduler.get("trained_betas") is not None:
        raise ValueError(f"unsupported beta schedule {name!r}; supported: {', '.join(names)}")
    T = scheduler.get("num_train_timesteps", 1000)
    if names[name] == "linear":
        scale = 1000 / T  # our linear schedule at T scales the paper's ends by 1000 / T
        ends = (scheduler.get("beta_start", 1e-4), scheduler.get("beta_end", 0.02))
        if abs(ends[0] - 1e-4 * scale) > 1e-9 or abs(ends[1] - 0.02 * scale) > 1e-9:
            raise ValueError(f"linear betas {ends} differ from the paper's (1e-4, 0.02) at T = {T}")
    return DiffusionConfig(names[name], T)


def _attention(ours: str, theirs: str, state: dict, out: dict, channels: int) -> None:
    """q, k, v, out projections (Linear, old or new diffusers names) -> our 1x1 convs."""
    new = f"{theirs}.to_q.weight" in state
    q, k, v, o = ("to_q", "to_k", "to_v", "to_out.0") if new else ("query", "key", "value", "proj_attn")
    out[f"{ours}.norm.weight"] = state.pop(f"{theirs}.group_norm.weight")
    out[f"{ours}.norm.bias"] = state.pop(f"{theirs}.group_norm.bias")
    weights = [state.pop(f"{theirs}.{name}.weight") for name in (q, k, v)]
    out[f"{ours}.qkv.weight"] = torch.cat(weights).view(3 * channels, channels, 1, 1)
    out[f"{ours}.qkv.bias"] = torch.cat([state.pop(f"{theirs}.{name}.bias") for name in (q, k, v)])
    out[f"{ours}.proj_out.weight"] = state.pop(f"{theirs}.{o}.weight").view(channels, channels, 1, 1)
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


def read_diffusers_folder(folder: str | Path) -> tuple[dict, dict, dict | None]:
    """(UNet config, state dict, scheduler config or None) from a diffusers model folder.

    Accepts a UNet folder (config.json + weights) or a pipeline folder with unet/ and
    scheduler/ subfolders. Weights are read safely: safetensors, or a .bin with weights_only.
    """
    folder = Path(folder)
    unet_dir = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
    if not (unet_dir / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {folder} (nor in {folder / 'unet'}): not a diffusers model folder")
    config = json.loads((unet_dir / "config.json").read_text())
    weights = next((unet_dir / name for name in WEIGHT_FILES if (unet_dir / name).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"no weights in {unet_dir}: expected one of {', '.join(WEIGHT_FILES)}")
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(weights)
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    scheduler = None
    for candidate in (folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json"):
        if candidate.is_file():
            scheduler = json.loads(candidate.read_text())
            break
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


def import_pretrained(source: str | Path, out: str | Path, cache_dir: str | Path | None = None) -> Checkpoint:
    """Convert a diffusers DDPM UNet (a local folder, or a Hub repository id) into a ddpm_core
    checkpoint at `out`. The imported weights are stored as the EMA weights too, since the
    released ones are EMA weights."""
    folder = Path(source) if Path(source).exists() else download(str(source), cache_dir)
    config_dict, state, scheduler = read_diffusers_folder(folder)
    model_config = model_config_from_diffusers(config_dict)
    model = UNet(model_config)
    model.load_state_dict(convert_diffusers_state_dict(state, model_config))
    weights = model.state_dict()
    checkpoint = Checkpoint(
        model_config=model_config,
        diffusion_config=diffusion_config_from_diffusers(scheduler),
        model_state=weights,
        ema_state=weights,
        metadata={"source": str(source), "imported_from": "diffusers UNet2DModel"},
    )
    save_checkpoint(checkpoint, out)
    log.info("imported %s into %s", source, out)
    return checkpoint
