"""benchmarks/tvm_kernels.py: the committed page is what its JSON renders to, every row has both
timings and a fused kernel that matched numpy's x W^T (to float rounding; the int8-activation GEMV
to x's int8 rounding)."""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def test_committed_page_is_what_the_json_gives():
    from benchmarks import tvm_kernels

    doc = json.loads((RESULTS / "tvm_kernels.json").read_text())
    assert tvm_kernels.markdown(doc) == (RESULTS / "tvm_kernels.md").read_text()
    assert doc["rows"] and all(r["fused_ms"] > 0 and r["dense_ms"] > 0 for r in doc["rows"])
    int8 = [r for r in doc["rows"] if "int8" in r["form"]]
    assert all(r["max_rel_error"] < 1e-4 for r in doc["rows"] if r not in int8)
    assert all(0 < r["max_rel_error"] < 3e-2 for r in int8)
    assert {r["form"] for r in doc["rows"]} >= {"tiled, dot", "tiled, outer product"}
