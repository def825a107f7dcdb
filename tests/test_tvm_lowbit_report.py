"""benchmarks/tvm_lowbit.py's option parsing and tables, from fake rows (no model, no TVM build): the MLP
table still renders the committed JSON into the committed page, and the MiniLM table says per row which
layers were not fused and why, records a failed build in its row, and reads the issue's target off."""
import json
from pathlib import Path

import pytest

from benchmarks import tvm_lowbit as tl

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def test_ratios_models_and_labels_parse():
    assert tl.parse_ratios("1/8,1/16") == [0.125, 0.0625]
    assert tl.parse_ratios("0.25") == [0.25]
    assert [tl.ratio_label(r) for r in (0.125, 1 / 16, 0.3)] == ["1/8", "1/16", "0.3"]
    assert tl.parse_models("mlp,minilm") == ["mlp", "minilm"]
    with pytest.raises(SystemExit):
        tl.parse_models("mlp,bert")


def test_committed_mlp_page_is_what_the_json_gives():
    doc = json.loads((RESULTS / "tvm_lowbit.json").read_text())
    assert tl.markdown(doc["rows"], doc["meta"]) == (RESULTS / "tvm_lowbit.md").read_text()


def _manifest(decodes):
    layers = [{"name": f"w{i}", "method": m, "decode": d, "why": why, "reason": None, "stored_bytes": 10,
               "dense_bytes": 400, "resident_bytes": 10 if d == "fused into the matmul" else 400}
              for i, (m, d, why) in enumerate(decodes)]
    return {"layers": layers}


def test_layer_summary_counts_per_method_and_place():
    s = tl.layer_summary(_manifest([("vq", "once at load", "slow gather"), ("vq", "once at load", "slow gather"),
                                    ("rotq", "fused into the matmul", None)]))
    assert s["groups"] == [{"method": "rotq", "decode": "fused into the matmul", "why": None, "layers": 1},
                           {"method": "vq", "decode": "once at load", "why": "slow gather", "layers": 2}]
    assert (s["resident_weight_bytes"], s["dense_weight_bytes"]) == (810, 1200)
    assert tl._groups_text(s) == "rotq x1 fused, vq x2 at load"


def _rows():
    lat = {"1": 10.0, "8": 40.0}
    fused = tl.layer_summary(_manifest([("rotq", "fused into the matmul", None)] * 2))
    mixed = tl.layer_summary(_manifest([("rotq", "fused into the matmul", None),
                                        ("vq", "once at load", "batch regime: 32 rows")]))
    common = {"model": "minilm", "plan": "auto-1/16", "ratio": 1 / 16, "rss_mib": 20.0,
              "output_rel_error": {"1": 0.1, "8": 0.1}, "embedding_cosine": {"1": 0.99, "8": 0.99}}
    return [
        {"model": "minilm", "form": "ort dense", "plan": None, "rss_mib": 100.0, "latency_ms": lat,
         "output_rel_error": {"1": 0.0, "8": 0.0}, "embedding_cosine": {"1": 1.0, "8": 1.0}, "errors": {}},
        {**common, "form": "tvm fused auto-1/16", "mode": "fused", "latency_ms": {"1": 5.0, "8": 30.0},
         "layers": {"1": fused, "8": fused}, "errors": {}},
        {**common, "form": "tvm auto auto-1/16", "mode": "auto", "latency_ms": {"1": 5.0},
         "layers": {"1": mixed}, "errors": {"8": "TVMError: cannot | build"}},
        {"model": "minilm", "form": "ort default-format auto-1/16", "plan": "auto-1/16", "layer_forms": {"functions": 2},
         "errors": {"measure": "RuntimeError: out of memory"}},
    ]


def test_minilm_table_shows_failures_unfused_layers_and_the_target():
    meta = {"command": "c", "date": "d", "load_before": [1, 1, 1], "load_after": [1, 1, 1], "cpu_count": 2,
            "machine": "m", "runs": 3, "elapsed_s": 1.0, "versions": {}, "batches": [1, 8],
            "minilm": {"model": "all-MiniLM-L6-v2", "model_bytes": 2 ** 20}}
    text = tl.markdown(_rows(), meta)
    assert text.startswith("# Low-bit weights at run time: TVM vs onnxruntime (all-MiniLM-L6-v2")
    assert "| auto-1/16 | tvm fused | 20 (0.20) | 5.00 (0.50) | 30.00 (0.75) | 1.00e-01 | 0.9900 | 0.0 (0.03) | " \
           "rotq x2 fused | - |" in text
    # a failed build is in its row (the pipe escaped), the batches it built are measured
    assert "| auto-1/16 | tvm auto | 20 (0.20) | 5.00 (0.50) | - |" in text
    assert "b8: TVMError: cannot / build |" in text
    assert "| ONNX functions x2 | measure: RuntimeError: out of memory |" in text
    assert "- tvm auto auto-1/16: vq x1 at load (batch 1): batch regime: 32 rows" in text
    assert "b1 weights 0.51x, latency 0.50x (not met); b8 not built. Overall: not met." in text
