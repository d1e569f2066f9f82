"""The run record: one schema for what runs write and reports read."""

import json

import pytest

from saftune.record import RunRecord
from saftune.report import format_markdown
from saftune.report.results import aggregate, load_results


def test_a_record_round_trips_and_keeps_unknown_keys():
    line = {"method": "saft", "seed": 2, "metrics": {"id": 0.7}, "sparsity": 0.001, "from_a_newer_version": [1, 2]}
    record = RunRecord.from_dict(line)
    assert record.sparsity == 0.001 and record.extra == {"from_a_newer_version": [1, 2]}
    assert record.to_dict() == line


def test_a_hook_field_outside_the_schema_is_refused_by_name():
    record = RunRecord(metrics={"id": 0.5})
    record.add({"mask_summary": [{"block": "a", "selected": 1, "total": 2}]}, "saft.record_fields")
    with pytest.raises(ValueError, match=r"saft.record_fields returned record fields \['mask_sumary'\]"):
        record.add({"mask_sumary": []}, "saft.record_fields")


def test_the_report_shows_how_each_row_was_chosen_and_the_validation_spread(tmp_path):
    selection = {"interior": {"lr": True, "sparsity": False}, "seeds": [1, 2], "val_mean": 0.8, "val_std": 0.02,
                 "trials": 11, "extended": 2}
    lines = [RunRecord(variant="saft", seed=s, metrics={"val": v, "id": v}, selected_options={"lr": 1e-3, "sparsity": 1e-2},
                       selection=selection).to_dict() for s, v in ((1, 0.78), (2, 0.82))]
    lines.append(RunRecord(variant="zeroshot", seed=1, metrics={"val": 0.6, "id": 0.6}).to_dict())
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    text = format_markdown(aggregate(load_results(path)))
    row = next(line for line in text.splitlines() if line.startswith("| saft ") and "sparsity=0.01" in line)
    assert [c.strip() for c in row.strip("|").split("|")] == ["saft", "lr=0.001, sparsity=0.01", "sparsity",
                                                              "80.0 ± 2.0 (seeds 1,2)", "11"]
    assert "| zeroshot " not in text.split("Hyperparameters chosen")[1]  # nothing chosen for it
