"""Make the bundled example model riem_compiler/examples/digits_cnn.onnx (the README's first command).

A small CNN (about 40k parameters, ~160 KB as ONNX) trained deterministically on scikit-learn's
8x8 digits, exported with torch.onnx.export (dynamo) with a dynamic batch dimension. Its test
accuracy and the export settings go into the model's metadata. Rerunning this script rewrites
the file; the result is deterministic up to torch/onnx versions.

Usage: python benchmarks/make_example.py [--quick] [--out riem_compiler/examples/digits_cnn.onnx]
Prints a table and writes benchmarks/results/make_example.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.models import digits_data, fit_digits  # noqa: E402

DEFAULT_OUT = ROOT / "riem_compiler" / "examples" / "digits_cnn.onnx"
RESULTS = ROOT / "benchmarks" / "results"
SEED = 0


class TinyDigitsCNN(nn.Module):
    """Three 3x3 convs and two Linear layers; the middle layers are big enough to compress,
    the first conv and the classifier stay below the default min_weight_size (1024)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 2 * 2, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 4x4
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)  # 2x2
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def train(epochs: int) -> tuple[nn.Module, float, float]:
    """Adam with cosine decay, batch 64; returns (model, test accuracy, seconds)."""
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    _, _, x_te, y_te = digits_data()
    model = TinyDigitsCNN()
    t0 = time.perf_counter()
    fit_digits(model, epochs, gen, augment=False)
    model.eval()
    with torch.no_grad():
        acc = float((model(x_te).argmax(1) == y_te).float().mean())
    return model, acc, time.perf_counter() - t0


def export(model: nn.Module, out: Path, accuracy: float) -> int:
    import onnx

    x = digits_data()[2][:4]
    batch = torch.export.Dim("batch", min=1, max=1024)
    with torch.no_grad():
        program = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=({0: batch},),
                                    input_names=["image"], output_names=["logits"], verbose=False)
    proto = program.model_proto
    proto.doc_string = ("riem_compiler example: small CNN on sklearn 8x8 digits (input (N,1,8,8) in [0,1], "
                        "output 10 logits); made by benchmarks/make_example.py")
    onnx.helper.set_model_props(proto, {"test_accuracy": f"{accuracy:.4f}", "dataset": "sklearn digits 80/20 seed 0"})
    onnx.checker.check_model(proto, full_check=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    onnx.save_model(proto, str(tmp))
    tmp.replace(out)
    return out.stat().st_size


def check(out: Path, model: nn.Module) -> float:
    """Max abs difference between onnxruntime on the file and torch, on the test images."""
    import onnxruntime as ort

    x_te = digits_data()[2]
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"image": x_te.numpy()})[0]
    with torch.no_grad():
        ref = model(x_te).numpy()
    return float(np.max(np.abs(got - ref)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 epochs, write to a results/ copy, not the package")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    epochs = 3 if args.quick else 40
    out = args.out or (RESULTS / "digits_cnn_quick.onnx" if args.quick else DEFAULT_OUT)
    model, acc, seconds = train(epochs)
    size = export(model, out, acc)
    diff = check(out, model)
    params = sum(p.numel() for p in model.parameters())
    row = {"file": str(out.relative_to(ROOT) if out.is_relative_to(ROOT) else out), "parameters": params,
           "bytes": size, "epochs": epochs, "train_seconds": round(seconds, 1), "test_accuracy": round(acc, 4),
           "ort_vs_torch_max_abs": diff, "torch": torch.__version__}
    md = ["| " + " | ".join(row) + " |", "|" + "---|" * len(row), "| " + " | ".join(str(v) for v in row.values()) + " |"]
    print("\n".join(md))
    name = "make_example_quick" if args.quick else "make_example"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text("\n".join(md) + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
