"""benchmarks/compress_time.py: the growth exponent, the page it writes, and one real measurement."""
import math

import pytest

from benchmarks import compress_time as ct


def test_growth_exponent_recovers_a_power_law():
    rows = [{"params": p, "seconds": 3e-6 * p ** 1.3} for p in (1e6, 4e6, 2e7)]
    k, c = ct.growth_exponent(rows)
    assert k == pytest.approx(1.3, abs=1e-9) and math.exp(c) == pytest.approx(3e-6, rel=1e-6)
    assert ct.growth_exponent(rows[:1]) is None


def test_page_names_its_runs_and_auto_split():
    run = {"date": "2026-12-06 20:00 UTC", "command": "python -m benchmarks.compress_time", "machine": "x",
           "load_before": [1, 1, 1], "load_after": [2, 2, 2]}
    rows = [{"model": "minilm", "method": "auto", "ratio": 0.125, "params": 2.2e7, "seconds": 12.5, "peak_rss_mb": 900,
             "rss_loaded_mb": 700, "fp32_weight_mb": 84, "stored_ratio": 0.1249, "run": run["date"],
             "auto_picked": {"vq": 20, "rotq": 16}, "auto_sensitivity_seconds": 3.0, "held_on_disk_mb": 41.4,
             "auto_timing": {"candidates": {"vq": 5.0, "rtn": 1.0}, "scoring": 1.5, "candidate_jobs_wall": 4.0,
                             "probes": 2.0, "planning": 0.1, "measurement": 1.0,
                             "screening": {"whole_fits": 120, "left_out": 850, "rounds": 2, "whole_fits_wall": 1.5}}},
            {"model": "minilm", "method": "nncf-peer", "ratio": 0.0625, "params": 2.2e7,
             "error": "no setting", "run": run["date"]}]
    for m, (p, s, peak, loaded) in {"bert-base x1": (7e6, 3.0, 600, 500), "bert-base x4": (2.8e7, 12.0, 700, 550)}.items():
        rows.append({"model": m, "method": "auto", "ratio": 0.125, "params": p, "seconds": s, "peak_rss_mb": peak,
                     "rss_loaded_mb": loaded, "fp32_weight_mb": p * 4 / 2**20, "run": run["date"]})
    page = ct.render({"runs": [run], "rows": rows})
    assert "`python -m benchmarks.compress_time`" in page and "[2, 2, 2]" in page
    assert ("| minilm | auto | 1/8 | 22.0 | 12.5 | 900 | 200 | 84 | 0.1249 | picked rotq x16, vq x20; "
            "41 MB of held candidates in files |") in page
    assert "| minilm | nncf-peer | 1/16 | 22.0 | - |" in page and "no setting" in page
    assert ("| minilm | auto | 1/8 | 12.5 | 3.0 | 4.0 | 120 of 970 (2, 1.5) | vq 5.0, rtn 1.0 | 1.5 | 2.0 | 0.1 | 1.0 "
            "| 2026-12-06 20:00 UTC |") in page
    assert "| auto | 2 | 1.00 |" in page  # time grows linearly on these two points
    # the peak RSS itself grows 100 MB over 80.1 fp32 MB (peak - loaded: 50 MB), against 2 MB per MB
    assert "| 1.25 (bert-base x1 to bert-base x4) | 1.25 (bert-base x1 to bert-base x4) |" in page
    assert "| 1.40x (bert-base x4) |" in page  # (700 - 550) / 106.8


def test_one_real_measurement_in_process():
    row = ct.measure_one("bert-base x1", "rtn", 0.125)
    assert "error" not in row, row
    assert row["params"] == 4 * 768 * 768 + 2 * 768 * 3072
    assert 0.12 < row["stored_ratio"] <= 0.125 and row["seconds"] > 0 and row["peak_rss_mb"] >= row["rss_loaded_mb"] > 0


def test_rows_are_written_as_they_finish_and_model_qualified_methods_run_on_that_model_only(tmp_path, monkeypatch):
    """A long run that stops keeps the rows it measured (the page says the run was in progress);
    `minilm:auto@ray` measures MiniLM only; the ladder table gives the growth with depth at fixed shapes."""
    done, stop_at = [], [3]

    def child(model, method, ratio, timeout):
        if len(done) == stop_at[0]:
            raise RuntimeError("the run stops here")
        done.append((model, method, ratio))
        params = {"minilm": 2.2e7, "effnet_lite2": 6e6, "bert-base x1": 7e6, "bert-base x4": 2.8e7}[model]
        return {"model": model, "method": method, "ratio": ratio, "params": params, "seconds": 1.0 + len(done),
                "peak_rss_mb": 500 + len(done) * 10, "rss_loaded_mb": 400, "fp32_weight_mb": params * 4 / 2**20}

    monkeypatch.setattr(ct, "_child", child)
    out = tmp_path / "ct"
    with pytest.raises(RuntimeError, match="stops here"):
        ct.main(["--models", "minilm", "effnet_lite2", "--methods", "rtn", "minilm:auto@ray", "--no-ladder",
                 "--out", str(out)])
    assert done == [("minilm", "rtn", 1 / 8), ("minilm", "auto@ray", 1 / 8), ("minilm", "rtn", 1 / 16)]
    import json

    doc = json.loads(out.with_suffix(".json").read_text())
    assert [(r["model"], r["method"], r["ratio"]) for r in doc["rows"]] == sorted(done, key=lambda t: (t[0], t[1], -t[2]))
    assert "in progress: 3 row(s) measured so far" in out.with_suffix(".md").read_text()
    done.clear()
    stop_at[0] = None
    ct.main(["--models", "effnet_lite2", "--methods", "rtn", "minilm:auto@ray", "--ladder", "bert-base x1",
             "bert-base x4", "--ladder-methods", "auto", "--out", str(out)])
    assert ("effnet_lite2", "auto@ray", 0.25) not in done and ("effnet_lite2", "rtn", 0.25) in done
    page = out.with_suffix(".md").read_text()
    assert "in progress" not in page.split("## Where")[0].split("\n- ")[-1]  # the last run finished
    assert "| 0.12 (bert-base x1 to bert-base x4) | bert-base: 4.0 / 1.2 s |" in page  # 1 block, then 4
