"""The GPU benchmark command runs end to end in its quick CPU form and writes every field.

`python -m benchmarks --device cuda` is meant for a GPU machine that CI does not have; its quick
form runs every section with tiny sizes, so the first GPU run does not fail on a typo.
"""

from __future__ import annotations

import json
import math

STEP_VARIANTS = {"dense", "powerprop", "powerprop+AP (first_batch)", "powerprop+AP (per_step)"}
STEP_FIELDS = {"step_ms", "time_ratio", "saved_mib", "saved_ratio", "peak_mib", "peak_ratio"}
ROUND_VARIANTS = {"dense (stacked)", "sparsyfed (stacked)", "dense (alone)", "sparsyfed (alone)",
                  "Lightning floor (alone)"}
METHODS = {"dense", "topk", "flash", "zerofl", "sparsyfed", "sparsyfed (per_step)", "sparsyfed (beta 1)",
           "sparsyfed_spectral"}
PAPER_FIELDS = {"rounds_timed", "stacked_clients", "time_train_s", "time_aggregate_s", "time_eval_s", "round_s",
                "synthetic_data_s"}


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_gpu_benchmarks_run_quickly_on_cpu_and_write_every_field(tmp_path, capsys):
    from benchmarks.__main__ import main

    out = tmp_path / "gpu.json"
    main(["--device", "cpu", "--quick", "--out", str(out), "--threads", "1"])
    result = json.loads(out.read_text())
    assert {"device", "torch", "quick", "date", "seconds", "section_seconds"} <= result.keys()
    assert result["quick"] is True and result["device"] == "cpu"
    assert set(result["section_seconds"]) == {"step", "round", "syncs_per_step", "paper_cifar10"}

    assert set(result["step"]) == STEP_VARIANTS
    for variant in result["step"].values():
        assert set(variant) == STEP_FIELDS
        assert all(_positive(variant[k]) for k in ("step_ms", "time_ratio", "saved_mib", "saved_ratio"))
        assert variant["peak_mib"] is None and variant["peak_ratio"] is None  # CUDA only

    assert _positive(result["round"]["plain_s"])
    assert set(result["round"]["ratios"]) == ROUND_VARIANTS
    assert all(_positive(r) for r in result["round"]["ratios"].values())

    assert set(result["syncs_per_step"]) == METHODS
    for counts in result["syncs_per_step"].values():
        assert set(counts) == {"steps", "recorded", "cuda", "operations"}
        assert counts["steps"] > 0 and counts["cuda"] is None
        assert counts["recorded"] == 0 and counts["operations"] == []

    paper = result["paper_cifar10"]
    assert set(paper) == PAPER_FIELDS
    assert paper["rounds_timed"] >= 1 and paper["stacked_clients"] == 2
    assert all(_positive(paper[k]) for k in PAPER_FIELDS - {"rounds_timed", "stacked_clients"})

    printed = capsys.readouterr().out
    assert "GPU benchmarks on cpu" in printed and "paper_cifar10" in printed

