"""bioimage.io: export, read back, compatibility, validation gate. The only package importing ``bioimageio``.

* :func:`export_package` writes a tested, zoo-ready model package (format 0.5; legacy mode for ilastik
  and deepImageJ on by default);
* :func:`read_package_model` rebuilds the PyTorch network of a package (``tilenorm-bmz convert MODEL.zip``);
* :func:`check_compatibility` reports whether ilastik and deepImageJ will run a package, with fixes;
* :func:`validate_package` is the acceptance gate (tile mismatch, train/eval disparity, seams as each consumer
  runs the package, halo sufficiency, bioimage.io test) -> :class:`GateReport`.
"""

from .collection import collection_report, write_collection_report
from .compat import CompatCheck, CompatibilityReport, check_compatibility
from .consumers import ConsumerSeams
from .export import ExportResult, GateHook, PackageRejected, checkpoint_sample, export_package, rejected_path
from .gate import GateImage, GateReport, gate_hook, validate_package
from .modeltest import PackageTestSummary, run_model_test
from .normalization import PackageNormalization
from .package_io import PackageError, read_package_model
from .record import RecordResult, record_gate_results
from .subject import GateInputError

__all__ = [
    "CompatCheck",
    "CompatibilityReport",
    "ConsumerSeams",
    "ExportResult",
    "GateHook",
    "GateImage",
    "GateInputError",
    "GateReport",
    "PackageError",
    "PackageNormalization",
    "PackageRejected",
    "PackageTestSummary",
    "RecordResult",
    "check_compatibility",
    "collection_report",
    "export_package",
    "gate_hook",
    "checkpoint_sample",
    "read_package_model",
    "record_gate_results",
    "rejected_path",
    "run_model_test",
    "validate_package",
    "write_collection_report",
]
