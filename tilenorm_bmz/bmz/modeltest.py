"""Run the bioimage.io model test on a package and keep its full evidence.

``bioimageio.core.test_model`` with ``determinism="full"``, every weight format present, and never
``stop_early`` (which stops after the first *passing* reproduction and still reports "passed").
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

__all__ = ["CheckResult", "PackageTestSummary", "run_model_test"]

logger = logging.getLogger(__name__)


class CheckResult(BaseModel):
    """One check of the bioimage.io test."""

    model_config = ConfigDict(extra="forbid")

    name: str
    status: Literal["passed", "failed"]
    errors: list[str] = []
    warnings: list[str] = []


class PackageTestSummary(BaseModel):
    """The outcome of ``bioimageio.core.test_model`` in plain data, with its Markdown rendering."""

    model_config = ConfigDict(extra="forbid")

    status: Literal["passed", "valid-format", "failed"]
    format_version: str
    checks: list[CheckResult]
    env: dict[str, str] = {}
    markdown: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def failed_checks(self) -> list[CheckResult]:
        return [c for c in self.checks if c.status == "failed"]

    def short(self) -> str:
        """One line: status and the failed checks with their first error."""
        if self.passed:
            return f"bioimage.io test passed ({len(self.checks)} checks)"
        failed = "; ".join(f"{c.name}: {c.errors[0] if c.errors else 'failed'}" for c in self.failed_checks)
        return f"bioimage.io test {self.status}: {failed}"


def run_model_test(package: Path, weight_format: str | None = None) -> PackageTestSummary:
    """Test ``package`` (zip, folder or rdf.yaml) for all its weight formats, full determinism, offline.

    ``weight_format``: test only that format (the gate's choice when the others would run untrusted code).

    ``test_model(determinism="full")`` switches ``torch.use_deterministic_algorithms`` on for the whole
    process and leaves it on (bioimageio.core 0.11); the previous setting is restored here, since later CUDA
    work (e.g. max-pool gradients in the receptive-field measurement) has no deterministic kernels.
    """
    import torch
    from bioimageio.core import test_model

    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        summary = test_model(package, weight_format=weight_format, determinism="full",  # type: ignore[arg-type]
                             stop_early=False)
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    checks = [
        CheckResult(
            name=d.name,
            status=d.status,
            errors=[f"{'.'.join(map(str, e.loc))}: {e.msg}" if e.loc else e.msg for e in d.errors],
            warnings=[f"{'.'.join(map(str, w.loc))}: {w.msg}" if w.loc else w.msg for w in d.warnings],
        )
        for d in summary.details
    ]
    env = {p.name: p.version for p in summary.env}
    result = PackageTestSummary(
        status=summary.status, format_version=summary.format_version, checks=checks, env=env,
        markdown=summary.format_md(),
    )
    logger.info("%s: %s", package, result.short())
    return result
