"""A real checkpoint written by torch-em's own trainer converts safely (fixture: tests/fixtures/torch_em/).

torch-em pickles its data loaders, datasets and augmentations into the checkpoint, so it does not load with
``weights_only=True``; tilenorm-bmz reads ``model_state`` and ``init["model_class"]``/``["model_kwargs"]``
with inert placeholders for everything else, never importing what the file names (torch-em, kornia).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tilenorm_bmz.checkpoint import load_checkpoint
from tilenorm_bmz.cli import EXIT_BAD_INPUT, EXIT_OK, app
from tilenorm_bmz.foreign import read_torch_em
from tilenorm_bmz.norm import BatchRenorm

FIXTURES = Path(__file__).parent / "fixtures" / "torch_em"
CHECKPOINT = FIXTURES / "unet2d_trainer_checkpoint.pt"
UNET_SOURCE = FIXTURES / "torch_em_unet.py"  # torch_em/model/unet.py of torch-em 0.10.9 (MIT), torch-only
PROBE = torch.linspace(0, 1, 64 * 64).reshape(1, 1, 64, 64)

runner = CliRunner()


def _expected() -> np.ndarray:
    return np.load(FIXTURES / "unet2d_expected_output.npy")


def _no_foreign_imports() -> None:
    assert not any(m == "torch_em" or m.startswith(("torch_em.", "kornia")) for m in sys.modules)


@pytest.fixture
def installed_torch_em(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """torch-em's UNet module, importable as ``torch_em.model.unet`` (the real file; the rest of torch-em is not
    needed to build its networks)."""
    root = tmp_path / "site"
    (root / "torch_em" / "model").mkdir(parents=True)
    (root / "torch_em" / "__init__.py").write_text("")
    (root / "torch_em" / "model" / "__init__.py").write_text("from .unet import UNet2d, UNet3d\n")
    shutil.copy(UNET_SOURCE, root / "torch_em" / "model" / "unet.py")
    monkeypatch.syspath_prepend(str(root))
    yield
    for name in [m for m in sys.modules if m == "torch_em" or m.startswith("torch_em.")]:
        del sys.modules[name]


def test_the_checkpoint_is_what_torch_em_writes() -> None:
    with pytest.raises(Exception, match="Unsupported global"):
        torch.load(CHECKPOINT, weights_only=True)
    tem = read_torch_em(CHECKPOINT)
    _no_foreign_imports()
    assert tem.model_class == "torch_em.model.unet.UNet2d"
    assert tem.model_kwargs["depth"] == 2 and tem.model_kwargs["initial_features"] == 4
    assert not any(k.startswith("_orig_mod.") for k in tem.state_dict)  # torch.compile's prefix is removed


def test_without_torch_em_the_error_says_how_to_give_the_architecture(tmp_path: Path) -> None:
    result = runner.invoke(app, ["convert", str(CHECKPOINT), "-o", str(tmp_path / "brn.pt")])
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert "torch-em" in result.output and "--arch-file" in result.output
    assert "weights_only=False" not in result.output
    assert not (tmp_path / "brn.pt").exists()
    _no_foreign_imports()


def _check_converted(path: Path, trust_code: bool) -> None:
    model, info = load_checkpoint(path, trust_code=trust_code)
    assert info.extra["source_kind"] == "torch_em"
    # torch-em's UNet2d normalizes with InstanceNorm: every one of its norm layers became a BatchRenorm
    converted = info.extra["conversion"]["converted"]
    assert converted and all(c["source_type"].startswith("InstanceNorm") for c in converted)
    assert sum(isinstance(m, BatchRenorm) for m in model.modules()) == len(converted)


def test_the_rebuilt_network_reproduces_torch_em(installed_torch_em) -> None:
    from tilenorm_bmz.bmz.opening import open_model

    handle = open_model(CHECKPOINT)
    assert handle.kind == "torch_em" and handle.trusted == ()
    with torch.no_grad():
        np.testing.assert_allclose(handle.network(PROBE).numpy(), _expected(), atol=1e-5)


def test_converts_with_installed_torch_em_without_trust(tmp_path: Path, installed_torch_em) -> None:
    result = runner.invoke(app, ["convert", str(CHECKPOINT), "-o", str(tmp_path / "brn.pt")])
    assert result.exit_code == EXIT_OK, result.output
    _check_converted(tmp_path / "brn.pt", trust_code=False)  # a torch-em class: no code from the file


def test_converts_with_the_architecture_file_when_torch_em_is_missing(tmp_path: Path) -> None:
    result = runner.invoke(app, ["convert", str(CHECKPOINT), "--arch-file", str(UNET_SOURCE), "--arch-callable",
                                 "UNet2d", "-o", str(tmp_path / "brn.pt")])
    assert result.exit_code == EXIT_OK, result.output
    _no_foreign_imports()
    with pytest.raises(ValueError, match="--trust-code"):  # the checkpoint now stores that source
        load_checkpoint(tmp_path / "brn.pt")
    _check_converted(tmp_path / "brn.pt", trust_code=True)
