"""docs/RESULTS.md and the README's results block are generated from benchmarks/results/*.json
(benchmarks/report.py): these tests fail when the committed text is not what the JSON gives, so a
number in the docs cannot go stale. Text only: the plots are not drawn here."""
import json

from benchmarks import report


def test_committed_results_page_and_readme_block_match_the_json():
    problems = report.check()
    assert not problems, "\n\n".join(problems)


def test_readme_holds_the_markers_once():
    text = report.README.read_text()
    assert text.count(report.BEGIN) == 1 and text.count(report.END) == 1


def _doc(rows, runs=None):
    return {"meta": {"machine": "test box", "runs": runs or {}}, "rows": rows}


def _row(method, budget, value, run="r1", **extra):
    return {"model": "digits_cnn", "method": method, "budget": budget, "ratio": budget, "run": run,
            "metrics": {"top1": value}, "stored_bytes": 10, "artifact_bytes": 1000, "fit_seconds": 1.0, **extra}


def test_every_accuracy_row_carries_its_run_and_missing_fields_say_not_recorded():
    doc = _doc([_row("original", 1.0, 0.99), _row("rtn", 0.25, 0.9), _row("newmethod", 0.25, 0.8, run="r2"),
                _row("hqq-peer", 0.25, 0.85, peer=True, ratio=0.27),
                {"model": "digits_cnn", "method": "vq", "budget": 0.25, "run": "r1", "error": "cannot"}],
               runs={"r1": {"command": "python benchmarks/accuracy.py --x", "load_average_at_start": [1.5, 2, 3]}})
    text = "\n".join(report.render_accuracy("accuracy.json", doc))
    assert "| newmethod | ours | 0.800 | r2 |" in text          # a method the script does not know is shown
    assert "| hqq-peer | peer | 0.850 [0.270] | r1 |" in text  # over the budget: the ratio beside it
    assert "| vq | ours | no fit | r1 |" in text
    assert "- r1: `python benchmarks/accuracy.py --x`, load average at start 1.5 2 3" in text
    assert "- r2: command not recorded, load average not recorded" in text


def test_latest_run_of_a_cell_wins_and_provenance_falls_back_to_not_recorded():
    doc = report.AccuracyDoc("a.json", _doc([_row("rtn", 0.25, 0.5, run="2026-01-01 10:00"),
                                            _row("rtn", 0.25, 0.7, run="2026-01-02 10:00")],
                                           runs={"2026-01-01 10:00": {}, "2026-01-02 10:00": {}}))
    assert [r["metrics"]["top1"] for r in doc.rows] == [0.7]
    assert report.provenance({"machine": "m"}) == {"date": "not recorded", "command": "not recorded",
                                                  "load": "not recorded", "machine": "m"}


def test_files_without_a_section_are_listed_as_not_rendered(tmp_path):
    (tmp_path / "accuracy.json").write_text(json.dumps(_doc([_row("original", 1.0, 0.99), _row("rtn", 0.25, 0.9)])))
    (tmp_path / "brand_new.json").write_text("{}")
    page = report.results_page(report.load_docs(tmp_path))
    assert "- `benchmarks/results/brand_new.json`" in page.split("## Not rendered here")[1]
    assert page == report.results_page(report.load_docs(tmp_path))  # deterministic


def test_headline_names_auto_our_best_single_method_and_the_peers():
    rows = [_row("original", 1.0, 0.99), _row("auto", 0.125, 0.95), _row("rtn", 0.125, 0.9),
            _row("vq", 0.125, 0.93), _row("affine", 0.125, 0.97, ratio=0.5),  # over budget: not "best"
            _row("hqq-peer", 0.125, 0.94, peer=True, ratio=0.133)]
    text = "\n".join(report.headline({"accuracy.json": _doc(rows)}))
    # each cell with the whole model as shipped (the row's artifact bytes), to compare at what a user ships
    assert ("| digits CNN (top-1) | 1/8 | 0.990 (1.0 kB) | 0.950 (1.0 kB) | vq 0.930 (1.0 kB) | "
            "0.940 [0.133] (1.0 kB) | r1 |") in text


def test_splice_replaces_only_the_block():
    readme = f"a\n{report.BEGIN}\nold\n{report.END}\nb\n"
    assert report.splice_readme(readme, "new\n") == f"a\n{report.BEGIN}\nnew\n{report.END}\nb\n"
