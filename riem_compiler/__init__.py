"""riem_compiler: data-free compression of linear/conv weights with RieM, exported to ONNX and TVM."""
import logging

__version__ = "0.1.0"

logging.getLogger("riem_compiler").addHandler(logging.NullHandler())

from riem_compiler.config import Config  # noqa: E402
from riem_compiler.api import Result, load, optimize  # noqa: E402
from riem_compiler.errors import FitError, InputError, RiemError  # noqa: E402
from riem_compiler.report import LayerRecord, Report  # noqa: E402

__all__ = ["Config", "Result", "load", "optimize", "InputError", "RiemError", "FitError", "Report",
           "LayerRecord", "__version__"]
