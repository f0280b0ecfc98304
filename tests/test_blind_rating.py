"""bench/blind_rating.py: raters see the grids only under random names, and their counts reach the counts file
under the grids' real names, checked against the key."""

import json
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import blind_rating  # noqa: E402

SCRIPT = REPO / "bench" / "blind_rating.py"


@pytest.fixture
def grids(tmp_path):
    """Three distinct small 'grids' (the tool copies files; it never decodes them)."""
    paths = {}
    for name in ("edm_s0", "ode_s0", "real_0_63"):
        paths[name] = tmp_path / "grids" / f"{name}.png"
        paths[name].parent.mkdir(exist_ok=True)
        paths[name].write_bytes(f"PNG of {name}".encode())
    return paths


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def rate(out_dir, rater, broken):
    """A rating of every grid the rater was given: `broken` faces (at row 1) in each."""
    key = json.loads((out_dir / "keys.json").read_text())[f"rater{rater}"]
    rating = {grid_file: {"clearly_broken": broken, "borderline": 1, "note": "fine",
                          "broken_positions": [[1, column + 1] for column in range(broken)]} for grid_file in key}
    (out_dir / "ratings" / f"rater{rater}.json").write_text(json.dumps(rating))
    return key


def test_each_rater_sees_every_grid_under_a_new_name_and_nothing_that_names_it(tmp_path, grids):
    out_dir = tmp_path / "blind"
    specs = [f"{name}={path}" for name, path in grids.items()]
    assert run("prepare", f"--out_dir={out_dir}", "--raters=7-9", *specs).returncode == 0
    keys = json.loads((out_dir / "keys.json").read_text())
    assert sorted(keys) == ["rater7", "rater8", "rater9"]
    for rater, key in keys.items():
        assert sorted(key.values()) == sorted(grids)
        shown = sorted(path.name for path in (out_dir / rater).iterdir())
        assert shown == sorted(key) and all(name.startswith("grid_") for name in shown)
        for grid_file, name in key.items():
            assert (out_dir / rater / grid_file).read_bytes() == grids[name].read_bytes()
        prompt = (out_dir / f"{rater}_prompt.txt").read_text()
        assert str((out_dir / rater).resolve()) in prompt and f"ratings/{rater}.json" in prompt
        assert not any(name in prompt for name in grids)
    assert len({tuple(sorted(key.items())) for key in keys.values()}) > 1  # shuffled anew for each rater
    assert blind_rating.blind_names(list(grids), 8) == keys["rater8"]  # rebuilt from the rater's number


def test_merge_files_counts_under_real_names_and_refuses_the_same_rater_twice(tmp_path, grids):
    out_dir = tmp_path / "blind"
    blind_rating.prepare(out_dir, [3, 4], grids)
    key = rate(out_dir, 3, broken=2)
    rate(out_dir, 4, broken=4)
    counts = tmp_path / "counts.json"
    counts.write_text(json.dumps({"what": "Counts.", "counts": {"edm_s0": {"rater1": {"clearly_broken": 5}}}}))
    result = run("merge", f"--out_dir={out_dir}", f"--counts={counts}", "--what=Raters 3-4 rated three grids.")
    assert result.returncode == 0, result.stderr
    assert "edm_s0_rater3 2" in result.stdout and "edm_s0_mean 3.00" in result.stdout
    document = json.loads(counts.read_text())
    assert document["what"] == "Counts. Raters 3-4 rated three grids."
    assert document["counts"]["edm_s0"]["rater1"] == {"clearly_broken": 5}
    blind_file = next(grid_file for grid_file, name in key.items() if name == "ode_s0")
    assert document["counts"]["ode_s0"]["rater3"]["grid_file"] == blind_file
    assert document["counts"]["ode_s0"]["rater4"]["broken_positions"] == [[1, 1], [1, 2], [1, 3], [1, 4]]
    assert '"broken_positions": [[1, 1], [1, 2]]' in counts.read_text()  # one line, as the file keeps them
    before = counts.read_text()
    again = run("merge", f"--out_dir={out_dir}", f"--counts={counts}")
    assert again.returncode != 0 and "already holds rater3" in again.stderr
    assert counts.read_text() == before  # nothing half-written


def test_counts_json_writes_the_shipped_counts_file_back_unchanged():
    text = (REPO / "docs" / "blind_counts.json").read_text()
    assert blind_rating.counts_json(json.loads(text)) + "\n" == text


@pytest.mark.parametrize("change, message", [
    (lambda rating, grid: rating.pop(grid), "the rater was given"),
    (lambda rating, grid: rating[grid].update(clearly_broken=3), "one \\[row, column\\]"),
    (lambda rating, grid: rating[grid].update(broken_positions=[[9, 1], [1, 1]]), "one \\[row, column\\]"),
    (lambda rating, grid: rating[grid].update(borderline="two"), "'borderline' as int"),
])
def test_merge_refuses_a_malformed_rating(tmp_path, grids, change, message):
    out_dir = tmp_path / "blind"
    blind_rating.prepare(out_dir, [5], grids)
    key = rate(out_dir, 5, broken=2)
    path = out_dir / "ratings" / "rater5.json"
    rating = json.loads(path.read_text())
    change(rating, next(iter(key)))
    path.write_text(json.dumps(rating))
    counts = tmp_path / "counts.json"
    counts.write_text(json.dumps({"what": "", "counts": {}}))
    with pytest.raises(ValueError, match=message):
        blind_rating.merge(out_dir, counts)


def test_prepare_refuses_bad_input_with_a_message(tmp_path, grids):
    out_dir = tmp_path / "blind"
    missing = run("prepare", f"--out_dir={out_dir}", "--raters=1", f"a={tmp_path / 'none.png'}")
    assert missing.returncode != 0 and "No grid at" in missing.stderr and not out_dir.exists()
    bad_range = run("prepare", f"--out_dir={out_dir}", "--raters=x", f"a={grids['edm_s0']}")
    assert bad_range.returncode != 0 and "--raters takes" in bad_range.stderr
    blind_rating.prepare(out_dir, [1], grids)
    with pytest.raises(FileExistsError, match="rater1 already prepared"):
        blind_rating.prepare(out_dir, [1, 2], grids)
    assert not (out_dir / "rater2").exists()
