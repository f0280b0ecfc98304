"""bench/blind_rating.py: raters see the grids only under random names, and their counts reach the counts file
under the grids' real names, checked against the key."""

import json
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import blind_rating  # noqa: E402

NAMES = ("edm_s0", "ode_s0", "real_0_63", "ddpm_s0", "dpmpp_s0")


@pytest.fixture
def grids(tmp_path):
    """Five distinct small 'grids' (the tool copies files; it never decodes them)."""
    folder = tmp_path / "grids"
    folder.mkdir()
    paths = {name: folder / f"{name}.png" for name in NAMES}
    for name, path in paths.items():
        path.write_bytes(f"PNG of {name}".encode())
    return paths


@pytest.fixture
def counts(tmp_path):
    """A counts file that already holds rater1's count of edm_s0."""
    path = tmp_path / "counts.json"
    path.write_text(json.dumps({"what": "Counts.", "counts": {"edm_s0": {"rater1": {"clearly_broken": 5}}}}))
    return path


def cli(*args):
    """bench/blind_rating.py's command line, in this process: its exit message, or None on success."""
    try:
        blind_rating.main([str(arg) for arg in args])
    except SystemExit as exit:
        assert exit.code not in (0, None)
        return str(exit.code)
    return None


def rate(out_dir, rater, broken, **changes):
    """Write rater<N>/rating.json: every grid it was given with `broken` faces (at row 1), then `changes`."""
    key = json.loads((out_dir / "keys.json").read_text())[f"rater{rater}"]
    rating = {grid_file: {"clearly_broken": broken, "borderline": 1, "note": "fine",
                          "broken_positions": [[1, column + 1] for column in range(broken)]} for grid_file in key}
    for field, value in changes.items():
        rating[next(iter(key))][field] = value
    (out_dir / f"rater{rater}" / "rating.json").write_text(json.dumps(rating))
    return key


def test_each_rater_sees_every_grid_in_its_own_order_and_nothing_that_names_it(tmp_path, grids, counts):
    out_dir = tmp_path / "blind"
    assert cli("prepare", f"--counts={counts}", f"--out_dir={out_dir}", "--raters=7-9",
               *[f"{name}={path}" for name, path in grids.items()]) is None
    keys = json.loads((out_dir / "keys.json").read_text())
    assert sorted(keys) == ["rater7", "rater8", "rater9"]
    for rater, key in keys.items():
        assert sorted(path.name for path in (out_dir / rater).iterdir()) == sorted(key)
        for grid_file, name in key.items():
            assert grid_file.startswith("grid_") and (out_dir / rater / grid_file).read_bytes() == grids[name].read_bytes()
        prompt = (out_dir / f"{rater}_prompt.txt").read_text()
        assert str((out_dir / rater / "rating.json").resolve()) in prompt and "{" in prompt and "{{" not in prompt
        assert not any(name in prompt for name in grids)
    orders = {tuple(key[grid_file] for grid_file in sorted(key)) for key in keys.values()}
    assert len(orders) == 3  # the grids' order differs between raters
    assert blind_rating.blind_names(list(grids), 8) == keys["rater8"]  # rebuilt from the rater's number


def test_merge_files_counts_under_real_names_and_skips_what_it_merged_before(tmp_path, grids, counts):
    out_dir = tmp_path / "blind"
    blind_rating.prepare(out_dir, [3, 4], grids, counts)
    key = rate(out_dir, 3, broken=2)
    assert cli("merge", f"--counts={counts}", f"--out_dir={out_dir}") is not None  # new grids need --what
    assert cli("merge", f"--counts={counts}", f"--out_dir={out_dir}", "--what=Raters 3-4 rated five grids.") is None
    document = json.loads(counts.read_text())
    assert document["what"] == "Counts. Raters 3-4 rated five grids."
    assert document["counts"]["edm_s0"]["rater1"] == {"clearly_broken": 5}
    blind_file = next(grid_file for grid_file, name in key.items() if name == "ode_s0")
    assert document["counts"]["ode_s0"]["rater3"] == {"grid_file": blind_file, "clearly_broken": 2, "borderline": 1,
                                                      "broken_positions": [[1, 1], [1, 2]], "note": "fine"}
    assert '"broken_positions": [[1, 1], [1, 2]]' in counts.read_text()  # one line, as the file keeps them
    rate(out_dir, 4, broken=4)  # a late rater, merged with the round's description again: rater 3 is skipped,
    blind_rating.merge(out_dir, counts, what="Raters 3-4 rated five grids.")  # rater 4 added, the text kept once
    document = json.loads(counts.read_text())
    assert document["counts"]["ode_s0"]["rater4"]["clearly_broken"] == 4
    assert document["counts"]["ode_s0"]["rater3"]["clearly_broken"] == 2
    assert document["what"] == "Counts. Raters 3-4 rated five grids."


def test_rater_numbers_already_used_are_refused(tmp_path, grids, counts):
    with pytest.raises(FileExistsError, match="rater1 already rated"):
        blind_rating.prepare(tmp_path / "blind", [1, 2], grids, counts)
    assert not (tmp_path / "blind" / "rater2").exists()
    out_dir = tmp_path / "other"
    blind_rating.prepare(out_dir, [2], grids, counts)
    with pytest.raises(FileExistsError, match="rater2 already rated"):
        blind_rating.prepare(out_dir, [2], grids, counts)
    rate(out_dir, 2, broken=1)
    blind_rating.merge(out_dir, counts, what="Rater 2.")
    rate(out_dir, 2, broken=3)  # the same number with other counts: not the same rater
    before = counts.read_text()
    with pytest.raises(ValueError, match="already holds other counts by rater2"):
        blind_rating.merge(out_dir, counts)
    assert counts.read_text() == before


def test_counts_json_writes_the_shipped_counts_file_back_unchanged():
    text = (REPO / "docs" / "blind_counts.json").read_text()
    assert blind_rating.counts_json(json.loads(text)) + "\n" == text


@pytest.mark.parametrize("changes, message", [
    (dict(clearly_broken=3), "one distinct \\[row, column\\]"),
    (dict(broken_positions=[[9, 1], [1, 1]]), "one distinct \\[row, column\\]"),
    (dict(broken_positions=[[1, 1], [1, 1]]), "one distinct \\[row, column\\]"),
    (dict(broken_positions=[["1", "2"], [1, 1]]), "one distinct \\[row, column\\]"),
    (dict(borderline="two"), "whole numbers"),
    (dict(clearly_broken=True, broken_positions=[[1, 1]]), "whole numbers"),
    (dict(note=None), "'note'"),
])
def test_merge_refuses_a_malformed_rating(tmp_path, grids, counts, changes, message):
    out_dir = tmp_path / "blind"
    blind_rating.prepare(out_dir, [5], grids, counts)
    rate(out_dir, 5, broken=2, **changes)
    with pytest.raises(ValueError, match=message):
        blind_rating.merge(out_dir, counts, what="Rater 5.")


def test_merge_refuses_a_rating_of_other_grids_or_one_grid_twice(tmp_path, grids, counts):
    out_dir = tmp_path / "blind"
    blind_rating.prepare(out_dir, [5], grids, counts)
    key = rate(out_dir, 5, broken=0)
    path = out_dir / "rater5" / "rating.json"
    text = path.read_text()
    first = next(iter(key))
    path.write_text(text.replace(first, "grid_none.png"))
    with pytest.raises(ValueError, match="must rate exactly the grids"):
        blind_rating.merge(out_dir, counts, what="Rater 5.")
    entry = json.dumps(json.loads(text)[first])
    path.write_text(text[:-1] + f', "{first}": {entry}}}')
    with pytest.raises(ValueError, match="rates a grid twice"):
        blind_rating.merge(out_dir, counts, what="Rater 5.")
    path.write_text(text[:-1])
    with pytest.raises(ValueError, match="not valid JSON"):
        blind_rating.merge(out_dir, counts, what="Rater 5.")


def test_prepare_refuses_bad_input_with_a_message(tmp_path, grids, counts):
    out_dir = tmp_path / "blind"
    message = cli("prepare", f"--counts={counts}", f"--out_dir={out_dir}", "--raters=2", f"a={tmp_path / 'none.png'}")
    assert "No grid at" in message and not out_dir.exists()
    for raters in ("x", "5-", "5-3"):
        assert "--raters takes" in cli("prepare", f"--out_dir={out_dir}", f"--raters={raters}", f"a={grids['edm_s0']}")
