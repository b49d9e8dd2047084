"""Importing diffusers' DDPM UNet (the released google/ddpm-cifar10-32 layout) into ours."""

import json
import os
import subprocess
import sys

import pytest
import torch
from diffusers import UNet2DModel

from ddpm_core.checkpoint import load_checkpoint
from ddpm_core.config import CIFAR10_PAPER_MODEL, DiffusionConfig, replace
from ddpm_core.pretrained import (
    convert_diffusers_state_dict,
    diffusion_config_from_diffusers,
    import_pretrained,
    model_config_from_diffusers,
)
from ddpm_core.unet import UNet

# google/ddpm-cifar10-32's config.json (Ho et al.'s CIFAR-10 model, converted by diffusers)
CIFAR10_DIFFUSERS_CONFIG = {
    "_class_name": "UNet2DModel", "act_fn": "silu", "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32,
    "out_channels": 3, "sample_size": 32, "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
MNIST_DIFFUSERS_CONFIG = {
    **CIFAR10_DIFFUSERS_CONFIG, "block_out_channels": [32, 64, 128], "in_channels": 1, "out_channels": 1,
    "sample_size": 28, "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
SCHEDULER = {"_class_name": "DDPMScheduler", "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
             "num_train_timesteps": 1000, "clip_sample": True, "variance_type": "fixed_large"}


def random_diffusers_unet(config: dict, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    model = UNet2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    with torch.no_grad():  # perturb every weight, GroupNorm affines too, so nothing is trivially 0 or 1
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


@pytest.mark.parametrize("config", [CIFAR10_DIFFUSERS_CONFIG, MNIST_DIFFUSERS_CONFIG], ids=["cifar10", "mnist"])
def test_converted_unet_computes_what_diffusers_computes(config):
    theirs = random_diffusers_unet(config)
    model_config = model_config_from_diffusers(config)
    ours = UNet(model_config).eval()
    ours.load_state_dict(convert_diffusers_state_dict(theirs.state_dict(), model_config))
    size, channels = config["sample_size"], config["in_channels"]
    x_t = torch.randn(3, channels, size, size)
    t = torch.tensor([0, 457, 999])
    with torch.no_grad():
        expected = theirs(x_t, t).sample
        got = ours(x_t, t)
    assert expected.abs().mean() > 1e-2  # a real signal, not two zero outputs
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_cifar10_config_is_the_papers():
    assert model_config_from_diffusers(CIFAR10_DIFFUSERS_CONFIG) == replace(CIFAR10_PAPER_MODEL, dropout=0.0)
    assert diffusion_config_from_diffusers(SCHEDULER) == DiffusionConfig("linear", 1000)


def test_old_diffusers_attention_names_are_read():
    theirs = random_diffusers_unet(MNIST_DIFFUSERS_CONFIG)
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for key, value in theirs.state_dict().items():
        for new, legacy in renames.items():
            key = key.replace(f".{new}.", f".{legacy}.")
        old[key] = value
    model_config = model_config_from_diffusers(MNIST_DIFFUSERS_CONFIG)
    torch.testing.assert_close(
        convert_diffusers_state_dict(old, model_config),
        convert_diffusers_state_dict(theirs.state_dict(), model_config),
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"norm_eps": 1e-5}, "norm_eps"),
        ({"downsample_padding": 1}, "downsample_padding"),
        ({"flip_sin_to_cos": True}, "flip_sin_to_cos"),
        ({"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"]}, "block types"),
        ({"attention_head_dim": 8}, "single-head"),
        ({"_class_name": "UNet2DConditionModel"}, "only UNet2DModel"),
    ],
)
def test_unsupported_layouts_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        model_config_from_diffusers({**CIFAR10_DIFFUSERS_CONFIG, **change})


def test_state_dict_that_does_not_fit_is_refused():
    config = model_config_from_diffusers(MNIST_DIFFUSERS_CONFIG)
    state = random_diffusers_unet(MNIST_DIFFUSERS_CONFIG).state_dict()
    with pytest.raises(ValueError, match="missing"):
        convert_diffusers_state_dict({k: v for k, v in state.items() if "mid_block" not in k}, config)
    with pytest.raises(ValueError, match="does not use"):
        convert_diffusers_state_dict({**state, "extra.weight": torch.zeros(1)}, config)


def test_import_from_a_folder_writes_a_checkpoint_that_samples(tmp_path):
    theirs = random_diffusers_unet(MNIST_DIFFUSERS_CONFIG)
    folder = tmp_path / "ddpm-mnist"
    theirs.save_pretrained(folder)  # config.json + diffusion_pytorch_model.safetensors
    (folder / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    out = tmp_path / "imported.pt"
    result = subprocess.run(
        [sys.executable, "-m", "ddpm_core", "import-pretrained", str(folder), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    checkpoint = load_checkpoint(out)
    assert checkpoint.diffusion_config == DiffusionConfig("linear", 1000)
    x_t, t = torch.randn(2, 1, 28, 28), torch.tensor([5, 900])
    with torch.no_grad():
        torch.testing.assert_close(checkpoint.build_model()(x_t, t), theirs(x_t, t).sample, rtol=0, atol=1e-5)
    # ... and the sample command takes it with no other flag
    grid, tensor = tmp_path / "grid.png", tmp_path / "samples.pt"
    result = subprocess.run(
        [sys.executable, "-m", "ddpm_core", "sample", "--checkpoint", str(out), "--sampler", "ddim", "--steps", "3",
         "--num", "5", "--batch-size", "2", "--out", str(grid), "--save-tensor", str(tensor), "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ema"] is True and report["steps"] == 3 and grid.is_file()
    samples = torch.load(tensor, weights_only=True)
    assert samples.shape == (5, 1, 28, 28) and samples.dtype == torch.uint8


def test_offline_download_fails_with_what_to_do(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(
        [sys.executable, "-m", "ddpm_core", "import-pretrained", "google/ddpm-cifar10-32", "--out", str(tmp_path / "x.pt")],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert result.returncode == 2
    assert "could not download 'google/ddpm-cifar10-32'" in result.stderr
    assert "pass that folder instead" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x.pt").exists()


def test_import_needs_no_network_for_a_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a diffusers model folder"):
        import_pretrained(tmp_path, tmp_path / "x.pt")
