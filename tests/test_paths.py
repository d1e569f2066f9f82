"""Names from a grid become directory names: none may leave the output directory or collide."""

import re

import pytest
import yaml

from saftune.grid import GridConfig, run_dir
from saftune.cli import main

GRID = {"name": "paths", "model": "tiny-sentence", "dataset": "toy-text", "seeds": [1], "methods": ["zeroshot"]}
BAD = ["..", ".", "../escape", "/etc/passwd", "a/b", "a\\b", "nul\0byte", "a__b", ".hidden", "-rf", "a b",
       "x" * 101, "ok\n"]
GOOD = ["saft", "saft-random", "wiseft_0.5", "lp+ft", "SAFT.v2", "x" * 100]
ALLOWED = "use 1 to 100 letters, digits and '.', '_', '+', '-', starting with a letter or digit and without '__'"


def _refused(what: str, name: str) -> str:
    return re.escape(f"{what} name {name!r} cannot be part of a directory name: {ALLOWED}")


@pytest.mark.parametrize("name", BAD)
def test_a_row_name_that_could_leave_the_directory_is_refused_when_the_grid_is_read(name):
    with pytest.raises(ValueError, match=_refused("grid row", name)):
        GridConfig.from_dict({**GRID, "methods": [{"name": name, "method": "zeroshot"}]})


@pytest.mark.parametrize("name", BAD)
def test_dataset_and_grid_names_are_checked_too(name):
    with pytest.raises(ValueError, match=_refused("dataset", name)):
        GridConfig.from_dict({**GRID, "datasets": ["toy-text", name]})
    with pytest.raises(ValueError, match=_refused("grid", name)):
        GridConfig.from_dict({**GRID, "name": name})


def test_an_empty_grid_name_is_refused():  # an empty row name means the method's name
    with pytest.raises(ValueError, match=_refused("grid", "")):
        GridConfig.from_dict({**GRID, "name": ""})


@pytest.mark.parametrize("name", GOOD)
def test_plain_names_are_accepted(name, tmp_path):
    bench = GridConfig.from_dict({**GRID, "name": name, "methods": [{"name": name, "method": "zeroshot"}],
                                   "datasets": ["toy-text", name]})
    assert [v.name for v in bench.variants()] == [name]
    assert run_dir(tmp_path, f"{name}/{name}/seed=1").parent == tmp_path / "runs"


@pytest.mark.parametrize("rid", ["..", ".", "", "a\0b"])
def test_run_dir_refuses_ids_that_leave_the_runs_directory(rid, tmp_path):
    with pytest.raises(ValueError, match=re.escape(f"run id {rid!r} does not name a directory inside")):
        run_dir(tmp_path, rid)
    # with "/" written "__", a run id with slashes stays one plain name inside runs/
    assert run_dir(tmp_path, "../../x") == tmp_path / "runs" / "..__..__x"


def test_run_dir_refuses_a_planted_symlink(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "runs" / "saft__seed=1").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="does not name a directory inside"):
        run_dir(tmp_path, "saft/seed=1")
    assert run_dir(tmp_path, "saft/seed=2") == tmp_path / "runs" / "saft__seed=2"


def test_the_cli_refuses_the_grid_before_writing_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump({**GRID, "methods": [{"name": "../../escape", "method": "zeroshot"}]}))
    assert main(["bench", "grid.yaml", "--no-report"]) == 2
    assert "grid row name '../../escape' cannot be part of a directory name" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.yaml"]  # no runs/, no out dir, nothing above
