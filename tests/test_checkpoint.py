"""Checkpoint round trips and every bad file gets its error."""

from __future__ import annotations

import os
import pickle
import textwrap
import zipfile

import pytest
import torch
from torch import nn

from tilenorm_bmz.checkpoint import (
    ArchitectureSpec,
    CheckpointError,
    load_checkpoint,
    load_torch_file,
    save_checkpoint,
)
from tilenorm_bmz.config import RenormSchedule
from tilenorm_bmz.errors import TrustError
from tilenorm_bmz.models import UNet
from tilenorm_bmz.norm import BatchRenorm, convert_norm

from .conftest import randomize_norm_stats

ARCH_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self, width=4):
            super().__init__()
            self.conv = nn.Conv2d(1, width, 3, padding=1)
            self.norm = nn.InstanceNorm2d(width, affine=True)
            self.head = nn.Conv2d(width, 1, 1)

        def forward(self, x):
            return self.head(torch.relu(self.norm(self.conv(x))))
    """
)


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_unet_round_trip_with_training_state(tmp_path) -> None:
    net = randomize_norm_stats(UNet(dims=2, features=4, norm="batchrenorm"))
    for m in net.modules():
        if isinstance(m, BatchRenorm):
            m.set_renorm_limits(2.0, 1.5)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.randn(2, 1, 16, 16)).mean().backward()
    opt.step()
    sched = RenormSchedule(warmup_steps=10, ramp_steps=5)
    path = save_checkpoint(tmp_path / "ck.pt", net, step=17, optimizer=opt, schedule=sched,
                           input_normalization={"mode": "global"}, note=tmp_path)
    assert not list(tmp_path.glob("*.tmp"))
    model, info = load_checkpoint(path)
    _assert_same_state(model, net)
    assert not model.training
    assert info.step == 17 and info.schedule == sched
    assert info.extra["input_normalization"] == {"mode": "global"} and info.extra["note"] == str(tmp_path)
    assert info.norm_kind == "batchrenorm"
    opt2 = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt2.load_state_dict(info.optimizer_state)
    # the limits travel with the checkpoint
    assert all(float(m.r_max) == 2.0 for m in model.modules() if isinstance(m, BatchRenorm))


def test_foreign_source_architecture_round_trip(tmp_path) -> None:
    spec = ArchitectureSpec(kind="source", source_code=ARCH_SOURCE, source_name="net.py", callable="Net",
                            kwargs={"width": 4})
    from tilenorm_bmz.checkpoint import build_model

    with pytest.raises(TrustError, match="--trust-code"):
        build_model(spec)
    net = build_model(spec, trust_code=True)
    convert_norm(net, inplace=True)
    spec = spec.model_copy(update={"norm_conversion": "batchrenorm", "convert_dims": 2})
    save_checkpoint(tmp_path / "f.pt", net, architecture=spec)
    with pytest.raises(TrustError, match=r"runs the Python source net\.py"):
        load_checkpoint(tmp_path / "f.pt")
    model, info = load_checkpoint(tmp_path / "f.pt", trust_code=True)
    assert isinstance(model.norm, BatchRenorm)
    _assert_same_state(model, net)
    assert info.architecture.callable == "Net"


def test_callable_architecture(tmp_path, monkeypatch) -> None:
    (tmp_path / "my_arch.py").write_text(ARCH_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = ArchitectureSpec(kind="callable", target="my_arch:Net", kwargs={"width": 3})
    from tilenorm_bmz.checkpoint import build_model

    net = build_model(spec, trust_code=True)
    save_checkpoint(tmp_path / "c.pt", net)
    with pytest.raises(TrustError, match="imports and calls my_arch:Net"):
        load_checkpoint(tmp_path / "c.pt")
    model, _ = load_checkpoint(tmp_path / "c.pt", trust_code=True)
    _assert_same_state(model, net)


def test_unknown_module_needs_an_architecture(tmp_path) -> None:
    with pytest.raises(ValueError, match="architecture="):
        save_checkpoint(tmp_path / "x.pt", nn.Conv2d(1, 1, 3))


def test_missing_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "absent.pt")


def test_truncated_file(tmp_path) -> None:
    path = save_checkpoint(tmp_path / "ck.pt", UNet(dims=2, features=4))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"not a PyTorch checkpoint.*truncated"):
        load_checkpoint(path)


def test_not_a_torch_file(tmp_path) -> None:
    path = tmp_path / "notes.pt"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_checkpoint(path)


def test_plain_state_dict_is_foreign_with_a_hint(tmp_path) -> None:
    torch.save(UNet(dims=2, features=4).state_dict(), tmp_path / "sd.pt")
    with pytest.raises(CheckpointError, match="--arch"):
        load_checkpoint(tmp_path / "sd.pt")


def test_torch_em_like_checkpoint_is_foreign_with_a_hint(tmp_path) -> None:
    torch.save({"model_state": {}, "init": {"model_class": "torch_em.model.UNet2d"}}, tmp_path / "te.pt")
    with pytest.raises(CheckpointError, match="torch-em"):
        load_checkpoint(tmp_path / "te.pt")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickled_code_is_never_executed(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    torch.save({"format": "tilenorm_bmz.checkpoint", "payload": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"holds pickled Python objects besides tensors.*never unpickles"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


def test_modified_weights_fail_the_checksum(tmp_path) -> None:
    path = save_checkpoint(tmp_path / "ck.pt", UNet(dims=2, features=4))
    obj = load_torch_file(path)
    key = next(iter(obj["state_dict"]))
    obj["state_dict"][key] = obj["state_dict"][key] + 1
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(path)


def test_weights_that_do_not_fit_the_architecture(tmp_path) -> None:
    path = save_checkpoint(tmp_path / "ck.pt", UNet(dims=2, features=4))
    obj = load_torch_file(path)
    obj["architecture"]["kwargs"]["features"] = 8
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match="do not match the architecture"):
        load_checkpoint(path)


def test_newer_format_version(tmp_path) -> None:
    path = save_checkpoint(tmp_path / "ck.pt", UNet(dims=2, features=4))
    obj = load_torch_file(path)
    obj["format_version"] = 99
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match="upgrade tilenorm-bmz"):
        load_checkpoint(path)


def test_zip_that_is_not_torch(tmp_path) -> None:
    path = tmp_path / "x.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a.txt", "b")
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_unstorable_extra_is_rejected_before_writing(tmp_path) -> None:
    with pytest.raises(TypeError, match="cannot be stored"):
        save_checkpoint(tmp_path / "ck.pt", UNet(dims=2, features=4), thing=object())
    assert not list(tmp_path.iterdir())


def test_pickle_module_unused() -> None:
    # guard: the loader relies on torch's weights-only unpickler, not on pickle.load
    assert pickle.UnpicklingError is not None
