"""The GPU run script (`benchmarks/gpu.sh`) works where no GPU is: its dry run, its refusals."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu.sh"


def _run(*args: str, timeout: int = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_gpu_script_refuses_unknown_arguments_and_a_machine_without_cuda():
    res = _run("--fast")
    assert res.returncode == 2 and "unknown argument --fast" in res.stderr
    if not torch.cuda.is_available():
        res = _run()
        assert res.returncode == 2 and "use --dry" in res.stderr


@pytest.mark.slow
def test_gpu_script_dry_run_writes_the_figures_with_the_device_named(tmp_path):
    md = tmp_path / "figures.md"
    res = _run("--dry", "--md", str(md), timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    text = md.read_text()
    device = "CPU (" if not torch.cuda.is_available() else "GPU "
    throughput = text[text.index("## Device throughput (dry run)"):].split("\n## ")[0]
    assert f"Machine: {device}" in throughput
    rows = [line for line in throughput.splitlines() if re.match(r"\| (48|64)\^3 \|", line)]
    assert len(rows) == 6  # 2 sizes x float32, autocast bfloat16, autocast float16
    rates = [float(re.findall(r"\*\*([0-9.]+)\*\*", r)[0]) for r in rows]
    assert all(rate > 0 for rate in rates)
    exact = re.search(r"Max \|float32 tiled - whole-volume forward\| = \*\*([0-9.e+-]+)\*\*", throughput)
    assert exact is not None and float(exact.group(1)) <= 1e-5
    gate = text[text.index("## Validation gate (cpu, dry run)"):]
    assert "Machine: CPU (" in gate and re.search(r"\| 64\^3 \| [0-9.]+ \| [0-9.]+ \| \*\*[0-9.]+x\*\*", gate)
    assert not (ROOT / "BENCHMARKS.md").read_text().count("dry run")  # the real figures are untouched
