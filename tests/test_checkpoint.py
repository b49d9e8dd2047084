"""Checkpoint files: round trip, atomic writes, and safe loading of bad files."""

from pathlib import Path

import pytest
import torch

from conftest import TINY_UNET
from ddpm_core.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from ddpm_core.config import DiffusionConfig
from ddpm_core.unet import UNet


def make_checkpoint(seed: int = 0) -> Checkpoint:
    torch.manual_seed(seed)
    model = UNet(TINY_UNET)
    state = {k: v + torch.randn_like(v) for k, v in model.state_dict().items()}
    return Checkpoint(TINY_UNET, DiffusionConfig("cosine", 50), state, metadata={"step": 7})


def test_round_trip_rebuilds_the_model_without_flags(tmp_path):
    path = save_checkpoint(make_checkpoint(), tmp_path / "a" / "ckpt.pt")
    loaded = load_checkpoint(path)
    assert loaded.model_config == TINY_UNET and loaded.diffusion_config == DiffusionConfig("cosine", 50)
    assert loaded.metadata == {"step": 7} and loaded.ema_state is None
    torch.testing.assert_close(loaded.build_model().state_dict(), make_checkpoint().model_state)


def test_ema_weights_are_preferred_for_sampling(tmp_path):
    checkpoint = make_checkpoint()
    checkpoint.ema_state = make_checkpoint(seed=1).model_state
    loaded = load_checkpoint(save_checkpoint(checkpoint, tmp_path / "c.pt"))
    torch.testing.assert_close(loaded.build_model().state_dict(), checkpoint.ema_state)
    torch.testing.assert_close(loaded.build_model(use_ema=False).state_dict(), checkpoint.model_state)


def test_the_sampling_model_is_channels_last_and_computes_the_same():
    checkpoint = make_checkpoint()
    fast, plain = checkpoint.build_model(), checkpoint.build_model(channels_last=False)
    # 3x3 kernels over several channels: where the two orders differ (1x1 or 1-channel ones are both)
    convs = [m.weight for m in fast.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
             and m.in_channels > 1]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs)
    assert all(m.weight.is_contiguous() for m in plain.modules() if isinstance(m, torch.nn.Conv2d))
    x, t = torch.randn(3, TINY_UNET.in_channels, 16, 16), torch.tensor([0, 20, 49])
    with torch.no_grad():
        out = fast(x, t)
        torch.testing.assert_close(out, plain(x, t), rtol=1e-4, atol=1e-4)
    assert out.abs().mean() > 0.1  # the random weights' conv_out is not zero: a real comparison


def test_a_crash_while_writing_keeps_the_last_good_file(tmp_path, monkeypatch):
    path = save_checkpoint(make_checkpoint(), tmp_path / "ckpt.pt")
    before = path.read_bytes()

    def crash(obj, target, *args, **kwargs):
        Path(target).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(make_checkpoint(seed=1), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left


def test_truncated_and_foreign_files_give_clear_errors(tmp_path):
    good = save_checkpoint(make_checkpoint(), tmp_path / "good.pt").read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="not a readable ddpm_core.checkpoint file"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="not a ddpm_core.checkpoint file"):
        load_checkpoint(foreign)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")


class RunsCode:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path(__import__('os').environ['MARKER']).write_text('ran')",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    monkeypatch.setenv("MARKER", str(marker))
    evil = tmp_path / "evil.pt"
    torch.save({"format": "ddpm_core.checkpoint", "payload": RunsCode()}, evil)
    with pytest.raises(ValueError, match="refused"):
        load_checkpoint(evil)
    assert not marker.exists()
