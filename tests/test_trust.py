"""No code that a file carries runs unless the user trusts it; packages that fail their integrity checks are refused.

Each attack is tried on every command that reads such a file, through the real CLI: the exit code is 2 (for
``validate`` on a package: a failed "package integrity" check, rejected), the message says what to do, and the
file the attack would write never appears.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tilenorm_bmz.checkpoint import save_checkpoint
from tilenorm_bmz.cli import EXIT_BAD_INPUT, EXIT_OK, EXIT_REJECTED, app
from tilenorm_bmz.config import InputNormalization
from tilenorm_bmz.models import UNet

from .test_format04 import NETWORK_SOURCE, build_v04_package

runner = CliRunner()

MARKER_ENV = "TILENORM_TEST_MARKER"


def run(*args: object) -> object:
    return runner.invoke(app, [str(a) for a in args])


# -- checkpoints whose architecture entry is an attack -------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("trust")
    torch.manual_seed(0)
    model = UNet(dims=2, in_channels=1, out_channels=2, depth=2, features=4, norm="batchrenorm").eval()
    save_checkpoint(d / "good.pt", model,
                    input_normalization=InputNormalization().model_dump(mode="json"))
    rng = np.random.default_rng(0)
    np.save(d / "image.npy", (rng.random((1, 96, 96)) * 255).astype("float32"))
    return d


def _with_architecture(src: Path, dst: Path, architecture: dict) -> Path:
    ckpt = torch.load(src, weights_only=True)
    ckpt["architecture"] = architecture  # the weights' checksum still matches: only the entry was edited
    torch.save(ckpt, dst)
    return dst


def _commands(model: Path, d: Path, out: Path) -> dict[str, list[object]]:
    image = d / "image.npy"
    return {
        "halo": ["halo", model],
        "predict": ["predict", model, image, "-o", out / "pred.npy"],
        "validate": ["validate", model, "--data", image, "--out", out / "gate"],
        "convert": ["convert", model, "-o", out / "brn.pt"],
        "package": ["package", model, "-o", out / "pkg.zip", "--sample", image, "--skip-gate", "--author", "A. Dev"],
        "train": ["train", "--resume", model, "--out", out / "run"],
    }


ATTACKS = {
    "callable": lambda marker: {"kind": "callable", "target": "os:system", "kwargs": {"command": f"touch {marker}"}},
    "source": lambda marker: {"kind": "source", "source_name": "net.py", "callable": "Net", "kwargs": {},
                              "source_code": f"open({str(marker)!r}, 'w').write('ran')\nclass Net:\n    pass\n"},
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
@pytest.mark.parametrize("command", ["halo", "predict", "validate", "convert", "package", "train"])
def test_stored_architecture_code_does_not_run_without_trust(workdir: Path, tmp_path: Path, attack: str,
                                                             command: str) -> None:
    marker = tmp_path / "marker"
    evil = _with_architecture(workdir / "good.pt", tmp_path / "evil.pt", ATTACKS[attack](marker))
    result = run(*_commands(evil, workdir, tmp_path)[command])
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert "--trust-code" in result.output
    assert "Traceback" not in result.output
    assert not marker.exists()


@pytest.mark.parametrize("command", ["halo", "predict", "validate", "convert", "package", "train"])
def test_a_trusted_callable_must_still_be_a_network_class(workdir: Path, tmp_path: Path, command: str) -> None:
    marker = tmp_path / "marker"
    evil = _with_architecture(workdir / "good.pt", tmp_path / "evil.pt", ATTACKS["callable"](marker))
    result = run(*_commands(evil, workdir, tmp_path)[command], "--trust-code")
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert "not a torch.nn.Module class" in result.output
    assert not marker.exists()


LEGIT_SOURCE = '''
from torch import nn


class Net(nn.Module):
    def __init__(self, channels=4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
                                  nn.Conv2d(channels, 1, 1), nn.Sigmoid())

    def forward(self, x):
        return self.body(x)
'''


def test_trust_code_runs_a_legitimate_architecture_file(tmp_path: Path) -> None:
    arch = tmp_path / "net.py"
    arch.write_text(LEGIT_SOURCE)
    ns: dict = {}
    exec(compile(LEGIT_SOURCE, str(arch), "exec"), ns)
    torch.save(ns["Net"]().state_dict(), tmp_path / "weights.pt")
    # the user names the file on the command line: that is their own choice, no flag needed to convert
    result = run("convert", tmp_path / "weights.pt", "--arch-file", arch, "--arch-callable", "Net", "-o",
                 tmp_path / "brn.pt")
    assert result.exit_code == EXIT_OK, result.output
    # the checkpoint now carries that source: a later command runs it only when trusted
    refused = run("halo", tmp_path / "brn.pt")
    assert refused.exit_code == EXIT_BAD_INPUT and "--trust-code" in refused.output
    trusted = run("halo", tmp_path / "brn.pt", "--trust-code")
    assert trusted.exit_code == EXIT_OK, trusted.output
    assert "ran Net from net.py" in trusted.output


def test_checkpoint_messages_tell_a_foreign_file_from_refused_pickles(tmp_path: Path) -> None:
    (tmp_path / "random.pt").write_bytes(os.urandom(2048))
    result = run("halo", tmp_path / "random.pt")
    assert result.exit_code == EXIT_BAD_INPUT
    assert "not a PyTorch checkpoint" in result.output and "tampered" not in result.output

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'marker'}",))

    torch.save({"format": "tilenorm_bmz.checkpoint", "payload": Payload()}, tmp_path / "pickled.pt")
    result = run("halo", tmp_path / "pickled.pt")
    assert result.exit_code == EXIT_BAD_INPUT
    assert not (tmp_path / "marker").exists()
    assert "weights_only=False" not in result.output and "tampered" not in result.output


# -- packages from strangers ---------------------------------------------------------------------------------
EVIL_SOURCE = f'''
import os as _os
if _os.environ.get("{MARKER_ENV}"):
    open(_os.environ["{MARKER_ENV}"], "w").write("ran")
''' + NETWORK_SOURCE


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pkgs")
    good = build_v04_package(d / "good", "batchnorm")
    evil_code = build_v04_package(d / "evil_code", "batchnorm", source=EVIL_SOURCE)
    rng = np.random.default_rng(0)
    np.save(d / "image.npy", (rng.random((1, 96, 96)) * 200 + 100).astype("float32"))
    return {"good": good, "evil_code": evil_code, "image": d / "image.npy"}


def _rewrite(src: Path, dst: Path, replace: dict[str, bytes] | None = None,
             add: list[tuple[zipfile.ZipInfo | str, bytes]] = ()) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            data = (replace or {}).get(info.filename, zin.read(info))
            zout.writestr(info.filename, data)
        for name, data in add:
            zout.writestr(name, data)
    return dst


def _symlink_member(name: str, target: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    info.create_system = 3
    return info


def _tampered_weights(src: Path) -> bytes:
    with zipfile.ZipFile(src) as zf:
        state = torch.load(io.BytesIO(zf.read("weights.pt")), weights_only=True)
    state = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


PACKAGE_ATTACKS = {
    "traversal": lambda good, out: _rewrite(good, out, add=[("../escaped.txt", b"x")]),
    "absolute": lambda good, out: _rewrite(good, out, add=[("/abs_escaped.txt", b"x")]),
    "symlink": lambda good, out: _rewrite(good, out, add=[(_symlink_member("link.txt", "/etc/passwd"),
                                                             b"/etc/passwd")]),
    "sha_mismatch": lambda good, out: _rewrite(good, out, replace={"weights.pt": _tampered_weights(good)}),
    "architecture_sha": lambda good, out: _rewrite(
        good, out, replace={"tiny_fcn.py": EVIL_SOURCE.encode()}),
    "oversized": lambda good, out: _rewrite(good, out, add=[("padding.bin", bytes(32 * 2**20))]),
}


def _package_commands(pkg: Path, image: Path, out: Path) -> dict[str, list[object]]:
    return {
        "halo": ["halo", pkg, "--trust-code"],
        "predict": ["predict", pkg, image, "-o", out / "pred.npy", "--trust-code"],
        "convert": ["convert", pkg, "-o", out / "brn.pt", "--trust-code"],
        "validate": ["validate", pkg, "--data", image, "--out", out / "gate", "--trust-code"],
    }


@pytest.mark.bmz
@pytest.mark.parametrize("attack", sorted(PACKAGE_ATTACKS))
@pytest.mark.parametrize("command", ["halo", "predict", "convert", "validate"])
def test_packages_that_fail_integrity_are_refused_by_every_command(packages: dict[str, Path], tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch, attack: str,
                                                                   command: str) -> None:
    marker = tmp_path / "marker"
    monkeypatch.setenv(MARKER_ENV, str(marker))  # the tampered architecture file writes it when it runs
    inner = tmp_path / "inner"
    inner.mkdir()
    pkg = PACKAGE_ATTACKS[attack](packages["good"], inner / "pkg.zip")
    before = pkg.read_bytes()
    result = run(*_package_commands(pkg, packages["image"], tmp_path)[command])
    if command == "validate":  # a verdict: rejected on its integrity alone, nothing of it run
        assert result.exit_code == EXIT_REJECTED, result.output
        report = json.loads((tmp_path / "gate" / "report.json").read_text())
        (check,) = [c for c in report["checks"] if c["name"] == "package integrity"]
        assert check["status"] == "failed" and not report["accepted"]
    else:
        assert result.exit_code == EXIT_BAD_INPUT, result.output
        assert not (tmp_path / "pred.npy").exists() and not (tmp_path / "brn.pt").exists()
    assert "Traceback" not in result.output
    assert not marker.exists()
    assert not (tmp_path / "escaped.txt").exists() and not Path("/abs_escaped.txt").exists()
    assert pkg.read_bytes() == before  # the input is never modified


@pytest.mark.bmz
@pytest.mark.parametrize("command", ["halo", "predict", "validate"])
def test_package_architecture_code_needs_trust_torchscript_is_used_instead(
        packages: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    marker = tmp_path / "marker"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    args = _package_commands(packages["evil_code"], packages["image"], tmp_path)[command][:-1]  # no trust
    result = run(*args)
    assert result.exit_code in (EXIT_OK, EXIT_REJECTED), result.output  # ran, on the TorchScript weights
    assert "torchscript" in result.output.lower()
    assert not marker.exists()


@pytest.mark.bmz
def test_convert_of_a_package_needs_trust_for_its_architecture_file(packages: dict[str, Path], tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "marker"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    refused = run("convert", packages["evil_code"], "-o", tmp_path / "brn.pt")
    assert refused.exit_code == EXIT_BAD_INPUT and "--trust-code" in refused.output
    assert not marker.exists() and not (tmp_path / "brn.pt").exists()
    trusted = run("convert", packages["evil_code"], "-o", tmp_path / "brn.pt", "--trust-code")
    assert trusted.exit_code == EXIT_OK, trusted.output
    assert marker.exists()  # with trust, the package's code ran: what --trust-code means


@pytest.mark.bmz
def test_unpacked_package_folders_with_links_are_refused(packages: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "pkg"
    with zipfile.ZipFile(packages["good"]) as zf:
        zf.extractall(folder)
    (folder / "weights.pt").unlink()
    (folder / "weights.pt").symlink_to(shutil.copy(packages["good"], tmp_path / "elsewhere.bin"))
    result = run("halo", folder)
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert "symbolic link" in result.output


# -- errors: the input's fault -> one line and 2; a bug -> its traceback and 3 (never 1) ---------------------
def test_a_broken_yaml_config_is_one_line_and_exit_2(workdir: Path, tmp_path: Path) -> None:
    (tmp_path / "gate.yaml").write_text("max_dist: [1, 2\n")
    result = run("validate", workdir / "good.pt", "--data", workdir / "image.npy", "--config", tmp_path / "gate.yaml",
                 "--out", tmp_path / "r")
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert "Traceback" not in result.output and result.output.count("error:") == 1


def test_an_unreadable_input_is_exit_2(workdir: Path, tmp_path: Path) -> None:
    (tmp_path / "folder.npy").mkdir()
    result = run("predict", workdir / "good.pt", tmp_path / "folder.npy", "-o", tmp_path / "out.npy")
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert "Traceback" not in result.output


def test_a_bug_shows_its_traceback_and_never_exit_1(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tilenorm_bmz.bmz.opening as opening

    def broken(*args, **kwargs):
        raise TypeError("a bug")

    monkeypatch.setattr(opening, "open_model", broken)
    for args in (["halo", workdir / "good.pt"], ["validate", workdir / "good.pt", "--data", workdir / "image.npy"]):
        result = run(*args)
        assert result.exit_code == 3, result.output
        assert "internal error" in result.output and "TypeError" in result.output


# -- found in review: each a way around the policy, closed ---------------------------------------------------
@pytest.mark.bmz
def test_choosing_torchscript_weights_never_runs_the_state_dict_code(packages: dict[str, Path], tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "marker"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    (tmp_path / "gate.yaml").write_text("weights: torchscript\n")
    result = run("validate", packages["evil_code"], "--data", packages["image"], "--config", tmp_path / "gate.yaml",
                 "--out", tmp_path / "r")
    assert result.exit_code in (EXIT_OK, EXIT_REJECTED), result.output
    assert not marker.exists()


@pytest.mark.bmz
@pytest.mark.slow
def test_a_package_claiming_our_unet_with_other_code_is_not_trusted(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    from tilenorm_bmz.bmz._yaml import dump_yaml, load_yaml

    zoo = Path(__file__).parents[1] / "model_zoo" / "nuclei2d-batchrenorm" / "nuclei2d-batchrenorm.bioimageio.zip"
    marker = tmp_path / "marker"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    with zipfile.ZipFile(zoo) as zf:
        code = zf.read("unet.py").decode()
        rdf = load_yaml(zf.read("rdf.yaml").decode())
    tampered = (f"import os as _os\nif _os.environ.get({MARKER_ENV!r}):\n"
                f"    open(_os.environ[{MARKER_ENV!r}], 'w').write('ran')\n" + code)
    arch = rdf["weights"]["pytorch_state_dict"]["architecture"]
    arch["sha256"] = hashlib.sha256(tampered.encode()).hexdigest()  # consistent, so integrity passes
    pkg = _rewrite(zoo, tmp_path / "claims_unet.zip", replace={"unet.py": tampered.encode(),
                                                             "rdf.yaml": dump_yaml(rdf).encode()})
    refused = run("convert", pkg, "-o", tmp_path / "brn.pt")  # its file is not our UNet: it needs trust
    assert refused.exit_code == EXIT_BAD_INPUT and "--trust-code" in refused.output
    result = run("validate", pkg, "--out", tmp_path / "r", "--skip", "consumers", "--skip", "sweep")
    assert result.exit_code in (EXIT_OK, EXIT_REJECTED), result.output
    assert not marker.exists()


def test_library_networks_that_load_files_or_are_not_allowlisted_need_trust() -> None:
    from tilenorm_bmz.checkpoint import ArchitectureSpec, build_model, needs_trust
    from tilenorm_bmz.errors import TrustError

    for spec in (
        ArchitectureSpec(kind="callable", target="torch_em.model.unetr:UNETR",  # unpickles encoder_checkpoint
                         kwargs={"encoder_checkpoint": "/tmp/evil.pt"}),
        ArchitectureSpec(kind="callable", target="torch_em.model:UNet2d", kwargs={"checkpoint": "/tmp/x.pt"}),
        ArchitectureSpec(kind="callable", target="monai.networks.nets:torch.nn.Linear", kwargs={}),
        ArchitectureSpec(kind="callable", target="monai.networks.nets.hovernet:HoVerNet",
                         kwargs={"pretrained_url": "https://example.invalid/w.pt"}),
    ):
        assert needs_trust(spec), spec
        with pytest.raises(TrustError, match="--trust-code"):
            build_model(spec)
    assert not needs_trust(ArchitectureSpec(kind="callable", target="monai.networks.nets:BasicUNet",
                                            kwargs={"spatial_dims": 2}))


def test_a_trusted_name_must_resolve_inside_its_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tilenorm_bmz.checkpoint import ArchitectureSpec, build_model
    from tilenorm_bmz.errors import TrustError

    # a module that poses as torch_em.model but re-exports a class from elsewhere
    pkg = tmp_path / "torch_em" / "model"
    pkg.mkdir(parents=True)
    (tmp_path / "torch_em" / "__init__.py").write_text("")
    (tmp_path / "elsewhere.py").write_text("import torch\nclass UNet2d(torch.nn.Identity):\n    pass\n")
    (pkg / "__init__.py").write_text("from elsewhere import UNet2d\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(TrustError, match="not a network class of the trusted libraries"):
            build_model(ArchitectureSpec(kind="callable", target="torch_em.model:UNet2d"))
    finally:
        for name in [m for m in sys.modules if m.startswith(("torch_em", "elsewhere"))]:
            del sys.modules[name]


@pytest.mark.bmz
def test_any_link_in_an_unpacked_package_is_refused(packages: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "pkg"
    with zipfile.ZipFile(packages["good"]) as zf:
        zf.extractall(folder)
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the package")
    (folder / "notes.txt").symlink_to(secret)  # named by nothing in the rdf
    result = run("validate", folder, "--data", packages["image"], "--out", tmp_path / "r", "--trust-code")
    assert result.exit_code == EXIT_REJECTED, result.output
    assert "symbolic link" in (tmp_path / "r" / "report.json").read_text()


def test_many_small_compressible_members_are_a_zip_bomb_too(tmp_path: Path) -> None:
    from tilenorm_bmz.bmz.archive import ArchiveLimits, open_package
    from tilenorm_bmz.errors import IntegrityError

    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("rdf.yaml", "type: model\n")
        for i in range(8):
            zf.writestr(f"part{i}.bin", bytes(2**20))  # each below the per-member floor
    limits = ArchiveLimits(ratio_floor_bytes=4 * 2**20)
    with pytest.raises(IntegrityError, match="the archive expands"):
        with open_package(bomb, limits=limits):
            pass


def test_earlier_releases_of_our_unet_are_recognized_and_compute_the_same(tmp_path: Path) -> None:
    import importlib.util

    from tilenorm_bmz.bmz.package_io import _is_our_unet
    from tilenorm_bmz.models import unet

    class Files:  # what _is_our_unet reads from a package
        def file(self, name: str, what: str) -> Path:
            return tmp_path / name

    released = sorted((Path(unet.__file__).parent / "released").glob("unet-*.py.txt"))
    assert released
    for src in [Path(unet.__file__), *released]:
        (tmp_path / "unet.py").write_text("# exported by an earlier tilenorm-bmz\n" + src.read_text())
        assert _is_our_unet(Files(), "unet.py"), src.name
    (tmp_path / "unet.py").write_text(released[0].read_text().replace("dim=1))", "dim=1) * 2)"))
    assert not _is_our_unet(Files(), "unet.py")  # other code is not ours
    torch.manual_seed(0)
    current = UNet(dims=2, in_channels=1, out_channels=2, depth=3, features=4, norm="batchrenorm").eval()
    x = torch.randn(1, 1, 48, 40)
    for src in released:  # each release builds the same network from the same kwargs and state dict
        name = f"released_{src.name.split('.')[0].replace('-', '_')}"
        loader = importlib.machinery.SourceFileLoader(name, str(src))
        module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader))
        loader.exec_module(module)
        old = module.UNet(dims=2, in_channels=1, out_channels=2, depth=3, features=4, norm="batchrenorm").eval()
        old.load_state_dict(current.state_dict())
        with torch.inference_mode():
            torch.testing.assert_close(old(x), current(x), rtol=0, atol=0)
