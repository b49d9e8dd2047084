"""Importing diffusers' DDPM UNet (the released google/ddpm-cifar10-32 layout) into ours."""

import io
import json
import os
import pickle
import shlex
import shutil

import huggingface_hub.constants
import pytest
import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file, save_file

from ddpm_core import pretrained
from ddpm_core.checkpoint import load_checkpoint
from ddpm_core.config import CIFAR10_PAPER_MODEL, DiffusionConfig, replace
from ddpm_core.files import OutputError
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
    "sample_size": 28, "layers_per_block": 1, "norm_num_groups": 8,  # 4 channels a group at 32 (ModelConfig)
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
# An 8x8 two-level UNet with attention: the smallest folder that exercises every reader
TINY_DIFFUSERS_CONFIG = {
    **MNIST_DIFFUSERS_CONFIG, "block_out_channels": [32, 64], "sample_size": 8,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
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


def test_import_from_a_folder_writes_a_checkpoint_that_samples(tmp_path, capsys):
    from ddpm_core.cli import main

    theirs = random_diffusers_unet(MNIST_DIFFUSERS_CONFIG)
    folder = tmp_path / "ddpm-mnist"
    theirs.save_pretrained(folder)  # config.json + diffusion_pytorch_model.safetensors
    (folder / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    out = tmp_path / "imported.pt"
    assert main(["import-pretrained", str(folder), "--out", str(out)]) == 0
    checkpoint = load_checkpoint(out)
    assert checkpoint.diffusion_config == DiffusionConfig("linear", 1000)
    x_t, t = torch.randn(2, 1, 28, 28), torch.tensor([5, 900])
    with torch.no_grad():
        torch.testing.assert_close(checkpoint.build_model()(x_t, t), theirs(x_t, t).sample, rtol=0, atol=1e-5)
    # ... and the sample command takes it with no other flag
    grid, tensor = tmp_path / "grid.png", tmp_path / "samples.pt"
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(out), "--sampler", "ddim", "--steps", "3", "--num", "5",
                 "--batch-size", "2", "--out", str(grid), "--save-tensor", str(tensor), "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ema"] is True and report["steps"] == 3 and grid.is_file()
    samples = torch.load(tensor, weights_only=True)
    assert samples.shape == (5, 1, 28, 28) and samples.dtype == torch.uint8


def test_offline_download_fails_with_what_to_do(tmp_path, monkeypatch, capsys):
    from ddpm_core.cli import main

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 does, internet or not
    with pytest.raises(SystemExit) as exit_:
        main(["import-pretrained", "google/ddpm-cifar10-32", "--out", str(tmp_path / "x.pt"),
              "--cache-dir", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "could not download 'google/ddpm-cifar10-32'" in err
    assert "pass that folder instead" in err and "Traceback" not in err
    assert not (tmp_path / "x.pt").exists()


def test_import_needs_no_network_for_a_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a diffusers model folder"):
        import_pretrained(tmp_path, tmp_path / "x.pt")


# ---- bad input: one line that names the file (or key) and the fix, never a traceback, nothing lost


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("diffusers") / "tiny"
    random_diffusers_unet(TINY_DIFFUSERS_CONFIG).save_pretrained(folder)  # config.json + .safetensors
    (folder / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    return folder


@pytest.fixture
def folder(saved_folder, tmp_path):
    """A fresh copy of the tiny diffusers folder, for a test to break."""
    return shutil.copytree(saved_folder, tmp_path / "model")


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if anything is downloaded or read: the refusal must come first."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the output should have been refused before any download or conversion")
    monkeypatch.setattr(pretrained, "download", forbidden)
    monkeypatch.setattr(pretrained, "read_diffusers_folder", forbidden)


def refused(error_type, call, *named) -> str:
    """Run `call`, expect `error_type` with a one-line message naming each of `named`; the message."""
    with pytest.raises(error_type) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for name in named:
        assert str(name) in message, message
    return message


def use_bin(folder, data: bytes):
    """Replace the folder's weights by a .bin file holding `data`; its path."""
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    path = folder / "diffusion_pytorch_model.bin"
    path.write_bytes(data)
    return path


def torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


class RunsCode:
    """Pickles as a call of os.system; never unpickle it outside these tests' refusals."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_a_good_folder_imports_in_process(folder, tmp_path):
    checkpoint = import_pretrained(folder, tmp_path / "ok.pt")
    assert load_checkpoint(tmp_path / "ok.pt").model_config == model_config_from_diffusers(TINY_DIFFUSERS_CONFIG)
    assert checkpoint.diffusion_config == DiffusionConfig("linear", 1000)


@pytest.mark.parametrize("name", ["config.json", "scheduler_config.json"])
@pytest.mark.parametrize(
    ("text", "says"),
    [('{\n  "in_channels": 1,\n  oops\n}', "line 3, column 3"), ("[1, 2]", "an array"), ("", "line 1, column 1"),
     ("\udcff", "not valid JSON")],
    ids=["syntax", "array", "empty", "not-utf8"],
)
def test_bad_json_names_the_file_and_where(folder, tmp_path, name, text, says):
    path = folder / name
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    refused(ValueError, lambda: import_pretrained(folder, tmp_path / "x.pt"), path, says)
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize(
    ("writer", "says"),
    [(lambda obj: pickle.dumps(obj, protocol=2), "system"), (lambda obj: pickle.dumps(obj, protocol=5), "refused"),
     (torch_bytes, "system")],
    ids=["pickle-2", "pickle-5", "torch.save"],
)
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on protocol 5, not our concern
def test_a_bin_that_would_run_code_is_refused_and_never_runs(folder, tmp_path, writer, says):
    marker = tmp_path / "payload-ran"
    path = use_bin(folder, writer({"conv_in.weight": RunsCode(marker)}))
    message = refused(ValueError, lambda: import_pretrained(folder, tmp_path / "x.pt"), path, "refused",
                      "weights_only", says)
    assert ".safetensors" in message  # the fix
    assert not marker.exists() and not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize(
    "data",
    [lambda good: b"", lambda good: good[: len(good) // 2], lambda good: torch_bytes([1, 2, 3]),
     lambda good: torch_bytes({"conv_in.weight": 1.0}), lambda good: torch_bytes({})],
    ids=["empty", "truncated", "a-list", "not-tensors", "no-weights"],
)
def test_a_bin_that_is_not_a_state_dict_is_refused(folder, tmp_path, data):
    good = torch_bytes(load_file(folder / "diffusion_pytorch_model.safetensors"))
    path = use_bin(folder, data(good))
    refused(ValueError, lambda: import_pretrained(folder, tmp_path / "x.pt"), path)
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize(
    "data",
    [lambda good: b"", lambda good: b"\x01", lambda good: good[: len(good) // 2],
     lambda good: (40).to_bytes(8, "little") + b"{not a json header}" + b" " * 21, lambda good: b"\xff" * 64],
    ids=["empty", "one-byte", "truncated", "bad-header", "huge-header-size"],
)
def test_an_empty_or_corrupt_safetensors_file_is_refused(folder, tmp_path, data):
    path = folder / "diffusion_pytorch_model.safetensors"
    path.write_bytes(data(path.read_bytes()))
    refused(ValueError, lambda: import_pretrained(folder, tmp_path / "x.pt"), path, "download it again")
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_weights_with_nan_or_inf_are_refused(folder, tmp_path, value, kind):
    saved = load_file(folder / "diffusion_pytorch_model.safetensors")
    state = {name: tensor.clone() for name, tensor in saved.items()}  # not the file's memory map: it is rewritten
    state["conv_out.weight"][0, 0, 0, 0] = value
    if kind == "bin":
        path = use_bin(folder, torch_bytes(state))
    else:
        path = folder / "diffusion_pytorch_model.safetensors"
        save_file(state, path)
    refused(ValueError, lambda: import_pretrained(folder, tmp_path / "x.pt"), path, "conv_out.weight", "NaN")
    assert not (tmp_path / "x.pt").exists()


DELETE = object()


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"block_out_channels": DELETE}, "block_out_channels"),
        ({"layers_per_block": DELETE}, "layers_per_block"),
        ({"in_channels": DELETE}, "in_channels"),
        ({"sample_size": DELETE}, "sample_size"),
        ({"block_out_channels": ["32", 64]}, "block_out_channels"),
        ({"block_out_channels": []}, "block_out_channels"),
        ({"block_out_channels": [0, 64]}, "block_out_channels"),
        ({"block_out_channels": [32, 64, 64]}, "block_out_channels"),
        ({"layers_per_block": [1]}, "layers_per_block"),
        ({"layers_per_block": True}, "layers_per_block"),
        ({"sample_size": "8"}, "sample_size"),
        ({"sample_size": [8, 16]}, "sample_size"),
        ({"in_channels": 1.5}, "in_channels"),
        ({"out_channels": [1]}, "out_channels"),
        ({"down_block_types": "DownBlock2D"}, "down_block_types"),
        ({"up_block_types": [None, "UpBlock2D"]}, "up_block_types"),
        ({"norm_eps": [1e-6]}, "norm_eps"),
    ],
)
def test_a_config_missing_a_key_or_of_the_wrong_type_names_the_key(change, key):
    config = {**TINY_DIFFUSERS_CONFIG, **change}
    config = {k: v for k, v in config.items() if v is not DELETE}
    refused(ValueError, lambda: model_config_from_diffusers(config), key)


@pytest.mark.parametrize(
    ("change", "key"),
    [({"num_train_timesteps": "1000"}, "num_train_timesteps"), ({"num_train_timesteps": 0}, "num_train_timesteps"),
     ({"num_train_timesteps": 1000.5}, "num_train_timesteps"), ({"beta_schedule": ["linear"]}, "beta_schedule"),
     ({"beta_start": "0.0001"}, "beta_start"), ({"beta_end": None}, "beta_end")],
)
def test_a_scheduler_config_of_the_wrong_type_names_the_key(change, key):
    refused(ValueError, lambda: diffusion_config_from_diffusers({**SCHEDULER, **change}), key)


def test_a_config_json_missing_a_key_is_refused_by_the_import(folder, tmp_path):
    config = json.loads((folder / "config.json").read_text())
    del config["block_out_channels"]
    (folder / "config.json").write_text(json.dumps(config))
    refused(ValueError, lambda: import_pretrained(folder, tmp_path / "x.pt"), "config.json", "block_out_channels")
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize(
    ("change", "weight"),
    [({"in_channels": 3, "out_channels": 3}, "conv_in.weight"),
     ({"block_out_channels": [64, 128]}, "down_blocks.1.attentions.0"),
     ({"layers_per_block": 2}, "missing")],
    ids=["shape", "attention", "missing"],
)
def test_weights_that_do_not_fit_the_config_name_the_source_and_the_weight(folder, tmp_path, change, weight):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    refused(ValueError, lambda: import_pretrained(folder, tmp_path / "x.pt"), folder, weight)
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("source", ["google/ddpm-cifar10-32", "a-local-folder"])
def test_an_existing_checkpoint_is_kept_and_refused_before_any_work(tmp_path, no_work, source):
    out = tmp_path / "precious.pt"
    out.write_bytes(b"weeks of training")
    refused(FileExistsError, lambda: import_pretrained(source, out), out, "--force", "--out")
    assert out.read_bytes() == b"weeks of training"


def test_force_replaces_an_existing_checkpoint(folder, tmp_path):
    out = tmp_path / "old.pt"
    out.write_bytes(b"old")
    import_pretrained(folder, out, force=True)
    assert load_checkpoint(out).model_config == model_config_from_diffusers(TINY_DIFFUSERS_CONFIG)


@pytest.mark.parametrize("where", ["under-a-file", "a-folder"])
@pytest.mark.parametrize("force", [False, True])
def test_an_unwritable_out_is_refused_before_any_work(tmp_path, no_work, where, force):
    (tmp_path / "file.pt").write_bytes(b"kept")
    out = tmp_path / "file.pt" / "x.pt" if where == "under-a-file" else tmp_path
    refused(OutputError, lambda: import_pretrained("google/ddpm-cifar10-32", out, force=force), out)
    assert (tmp_path / "file.pt").read_bytes() == b"kept"
