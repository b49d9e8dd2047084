"""The noise-aware classifier p_phi(y | x_t, t) that classifier guidance differentiates.

This module owns the classifier: its network (the UNet's downsampling half with the same
timestep embedding, then pooling, as in Dhariwal & Nichol 2021, Sec. 4), its training on
`q_sample`d images, its accuracy over t, and its file format. How its gradient steers the
sampler is `ddpm_core.guidance`. (The clean-image judge of guided samples is a different,
independent network: `ddpm_core.judge`.)
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ddpm_core.checkpoint import atomic_save, check_state, safe_load, stored_config
from ddpm_core.config import ClassifierConfig, DiffusionConfig, ModelConfig, replace, to_dict
from ddpm_core.diffusion import q_sample, sample_timesteps
from ddpm_core.layers import AttentionBlock, Downsample, ResnetBlock, TimestepEmbedding, group_norm
from ddpm_core.runtime import progress_bar
from ddpm_core.schedule import NoiseSchedule

FORMAT = "ddpm_core.noisy_classifier"


class NoisyClassifier(nn.Module):
    """p_phi(y | x_t, t): (B, C, H, W), (B,) long -> logits (B, num_classes).

    conv_in and the down levels of `UNet(config)` (ResNet blocks fed the timestep embedding,
    attention where the config puts it), the middle block, then GroupNorm, SiLU, global
    average pooling and a linear layer. Only the shape fields of `config` are used.
    """

    def __init__(self, config: ModelConfig, num_classes: int = 10):
        super().__init__()
        self.config, self.num_classes = config, num_classes
        ch, emb_dim = config.base_channels, 4 * config.base_channels
        attn_at = set(config.attention_resolutions) if config.attention else set()
        self.temb = TimestepEmbedding(ch, emb_dim)
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)
        self.blocks = nn.ModuleList()
        width, last = ch, len(config.channel_mults) - 1
        for level, (mult, res) in enumerate(zip(config.channel_mults, config.resolutions)):
            for _ in range(config.num_res_blocks):
                self.blocks.append(ResnetBlock(width, ch * mult, emb_dim, config.dropout, config.norm_groups))
                width = ch * mult
                if res in attn_at:
                    self.blocks.append(AttentionBlock(width, config.norm_groups))
            if level != last:
                self.blocks.append(Downsample(width))
        self.mid_block = ResnetBlock(width, width, emb_dim, config.dropout, config.norm_groups)
        self.norm_out = group_norm(width, config.norm_groups)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb_act = self.temb(t)  # SiLU(temb), (B, 4ch)
        h = self.conv_in(x_t)  # (B, ch, H, W)
        for block in self.blocks:
            h = block(h, temb_act) if isinstance(block, ResnetBlock) else block(h)
        h = F.silu(self.norm_out(self.mid_block(h, temb_act)))  # (B, width, H', W')
        return self.head(h.mean(dim=(2, 3)))  # (B, num_classes)


# ClassifierConfig's fields that override the diffusion model's shape when set (not None)
_OWN_SHAPE_FIELDS = ("channel_mults", "base_channels")


def classifier_model_config(model_config: ModelConfig, config: ClassifierConfig) -> ModelConfig:
    """The classifier's shape: the diffusion model's, unconditional, without dropout, with the
    levels and width `config` sets for itself (`ClassifierConfig.channel_mults`, `.base_channels`)."""
    own = {name: getattr(config, name) for name in _OWN_SHAPE_FIELDS if getattr(config, name) is not None}
    return replace(model_config, dropout=0.0, num_classes=None, kind="unet", **own)


def train_noisy_classifier(classifier: NoisyClassifier, schedule: NoiseSchedule, dataset: Dataset,
                           config: ClassifierConfig, device: torch.device | str = "cpu",
                           progress: bool = False) -> list[float]:
    """Train on x_t = q_sample(x0, t) with t uniform over all T (cross-entropy against the
    clean image's label). Returns the loss of every step."""
    device = torch.device(device)
    classifier.to(device).train()
    schedule = schedule.to(device)
    generator = torch.Generator().manual_seed(config.seed)
    step_generator = torch.Generator(device).manual_seed(config.seed + 1)  # t and noise
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps)
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=True, generator=generator)
    losses: list[float] = []
    with progress_bar(total=config.steps, desc="noise-aware classifier", disable=not progress) as bar:
        while len(losses) < config.steps:
            for x0, y in loader:
                x0, y = x0.to(device), y.to(device)
                t = sample_timesteps(len(x0), schedule.num_timesteps, device, step_generator)
                x_t = q_sample(schedule, x0, t, generator=step_generator)
                loss = F.cross_entropy(classifier(x_t, t), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)  # drawn at the next redraw
                if len(losses) == config.steps:
                    break
    return losses


@torch.no_grad()
def accuracy_by_timestep(classifier: NoisyClassifier, schedule: NoiseSchedule, x0: torch.Tensor, y: torch.Tensor,
                         timesteps: list[int], generator: torch.Generator | None = None) -> list[float]:
    """The share of x0 (N, C, H, W) with labels y (N,) classified correctly after noising them
    to each t of `timesteps`: one accuracy per t."""
    device = next(classifier.parameters()).device
    schedule, x0, y = schedule.to(device), x0.to(device), y.to(device)
    classifier.eval()
    accuracies = []
    for t in timesteps:
        t_batch = torch.full((len(x0),), t, device=device, dtype=torch.long)
        x_t = q_sample(schedule, x0, t_batch, generator=generator)
        accuracies.append((classifier(x_t, t_batch).argmax(1) == y).float().mean().item())
    return accuracies


def save_noisy_classifier(classifier: NoisyClassifier, diffusion_config: DiffusionConfig, path: str | Path,
                          metadata: dict | None = None) -> Path:
    """Write the classifier atomically with its shape and the diffusion it was trained for."""
    payload = {"format": FORMAT, "model_config": to_dict(classifier.config), "num_classes": classifier.num_classes,
               "diffusion_config": to_dict(diffusion_config), "state": classifier.state_dict(),
               "metadata": metadata or {}}
    return atomic_save(payload, path)


def load_noisy_classifier(path: str | Path, map_location: str | torch.device = "cpu"
                          ) -> tuple[NoisyClassifier, DiffusionConfig]:
    """Read a classifier written by `save_noisy_classifier` (weights only), in eval mode, with
    the diffusion config it was trained for (its T and schedule must match the sampler's)."""
    path = Path(path)
    payload = safe_load(path, FORMAT, "train one with `python -m ddpm_core train-classifier`", map_location)
    config = stored_config(payload, "model_config", ModelConfig, path)
    diffusion = stored_config(payload, "diffusion_config", DiffusionConfig, path)
    num_classes = payload.get("num_classes")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(f"{path}: its num_classes is {num_classes!r}, not a count of classes; the file is damaged")
    classifier = NoisyClassifier(config, num_classes)
    check_state(payload.get("state"), classifier, path)
    classifier.load_state_dict(payload["state"])
    return classifier.eval(), diffusion
