"""Example models shipped with the package (made by benchmarks/make_example.py).

digits_cnn.onnx: a small CNN trained on scikit-learn's 8x8 digits (input "image" (N, 1, 8, 8)
in [0, 1], output "logits" (N, 10); ~40k parameters, 97.8% test accuracy, 175 KB).
Try: riem-compile "$(python -m riem_compiler.examples)" -o out/
"""
from pathlib import Path

EXAMPLES_DIR = Path(__file__).resolve().parent
DIGITS_CNN_ONNX = EXAMPLES_DIR / "digits_cnn.onnx"


def path(name: str = "digits_cnn.onnx") -> Path:
    """Path of a bundled example file."""
    p = EXAMPLES_DIR / name
    if not p.is_file():
        raise FileNotFoundError(f"no example {name!r}; available: {sorted(f.name for f in EXAMPLES_DIR.glob('*.onnx'))}")
    return p
