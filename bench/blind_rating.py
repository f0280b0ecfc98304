"""Count broken faces blind: hand grids to raters under random names, then merge their counts (REPORT.md 6.14).

    python bench/blind_rating.py prepare --out_dir=/tmp/blind --raters=116-118 \\
        edm_s0=runs/a/edm_s0.png ode_s0=runs/a/ode_s0.png real_heldout_0_63=runs/real_0_63.png
    # give each rater (a new helper session that sees nothing else) /tmp/blind/rater<N>_prompt.txt
    python bench/blind_rating.py merge --out_dir=/tmp/blind --what="Raters 116-118 (REPORT.md 6.21) rated ..."

`prepare` copies the grids into one folder per rater, `<out_dir>/rater<N>/grid_<letter>.png`, in an order shuffled
anew for each rater (seeded by the rater's number, so a round can be rebuilt), and writes the key to
`<out_dir>/keys.json`, outside every rater's folder. It refuses rater numbers that the counts file already holds.
Each rater's prompt (`bench/blind_rater_prompt.txt` with its folder filled in) describes what counts as clearly
broken and asks for `<out_dir>/rater<N>/rating.json`. `merge` checks every rating against the key (each grid rated
once; as many positions as clearly broken faces, all inside the 8x8 grid) and adds it to the counts file under the
grid's real name. A rating already merged as it is gets skipped, so `merge` can run again when a late rater
finishes; any other rater number already in the counts file is refused. It prints `key value` lines:
`<grid>_rater<N>` (clearly broken faces) and `<grid>_mean` over the raters merged.
"""

import argparse
import json
import pathlib
import random
import shutil
import string
import sys

import common  # noqa: F401  (puts the repository on sys.path)

from keras_ddpm import files

PROMPT = pathlib.Path(__file__).with_name("blind_rater_prompt.txt")
COUNTS = common.REPO / "docs" / "blind_counts.json"
GRID_SIDE = 8  # the grids are 8x8 tiles: `python sample.py`'s 64 images
COUNT_FIELDS = ("clearly_broken", "borderline")


def parse_raters(text: str) -> list[int]:
    """'116-118' -> [116, 117, 118]; '116' -> [116]."""
    first, dash, last = text.partition("-")
    if not first.isdigit() or (dash and not last.isdigit()) or int(last or first) < int(first):
        raise ValueError(f"--raters takes a number or a range like 116-118, got {text!r}.")
    return list(range(int(first), int(last or first) + 1))


def parse_grids(specs: list[str]) -> dict[str, pathlib.Path]:
    """{'name': path} from 'name=path.png' arguments, each an existing PNG under a distinct name."""
    grids = {}
    for spec in specs:
        name, _, path = spec.partition("=")
        path = pathlib.Path(path)
        if not name or path.suffix.lower() != ".png":
            raise ValueError(f"A grid is name=grid.png, got {spec!r}.")
        if not path.is_file():
            raise FileNotFoundError(f"No grid at {path} (for {name}).")
        if name in grids:
            raise ValueError(f"Grid name {name!r} is given twice.")
        grids[name] = path
    if not 1 <= len(grids) <= len(string.ascii_uppercase):
        raise ValueError(f"Give 1 to 26 grids (one letter each), got {len(grids)}.")
    return grids


def read_counts(path: pathlib.Path) -> dict:
    """The counts file: {"what": description, "counts": {grid name: {"rater<N>": entry}}}."""
    document = files.read_json(path)
    if not isinstance(document.get("what"), str) or not isinstance(document.get("counts"), dict):
        raise ValueError(f"{path} is not a counts file: it needs 'what' (text) and 'counts' (grid -> rater -> count).")
    return document


def raters_in(document: dict) -> set[str]:
    return {rater for ratings in document["counts"].values() for rater in ratings}


def blind_names(names: list[str], rater: int) -> dict[str, str]:
    """{'grid_<letter>.png': name} in letter order: the grids in an order shuffled by the rater's number."""
    letters = random.Random(rater).sample(string.ascii_uppercase, len(names))
    return {f"grid_{letter}.png": name for letter, name in sorted(zip(letters, names))}


def prepare(out_dir: pathlib.Path, raters: list[int], grids: dict[str, pathlib.Path], counts_path=COUNTS) -> None:
    """One folder of renamed grids and one prompt per rater; the key in `out_dir`/keys.json."""
    keys_path = out_dir / "keys.json"
    keys = files.read_json(keys_path) if keys_path.is_file() else {}
    taken = raters_in(read_counts(counts_path)) | set(keys)
    taken |= {f"rater{rater}" for rater in raters if (out_dir / f"rater{rater}").exists()}
    reused = [f"rater{rater}" for rater in raters if f"rater{rater}" in taken]
    if reused:
        raise FileExistsError(f"{', '.join(reused)} already rated (in {counts_path}) or prepared (in {out_dir}); "
                              f"choose rater numbers above {max(int(name[5:]) for name in taken)}.")
    template = PROMPT.read_text()
    for rater in raters:
        keys[f"rater{rater}"] = blind_names(list(grids), rater)
    files.write_json(keys_path, keys)  # first: whatever is copied below can be merged
    for rater in raters:
        folder = out_dir / f"rater{rater}"
        folder.mkdir()
        key = keys[f"rater{rater}"]
        for blind_name, name in key.items():
            shutil.copyfile(grids[name], folder / blind_name)
        prompt = template.format(folder=folder.resolve(), count=len(key), grid_files=", ".join(key),
                                 output=(folder / "rating.json").resolve())
        files.write_text(out_dir / f"rater{rater}_prompt.txt", prompt)
        print(f"rater{rater}_prompt {out_dir / f'rater{rater}_prompt.txt'}")


def is_count(value) -> bool:
    return type(value) is int and value >= 0  # `type`, not isinstance: JSON's true is not a count


def read_rating(source: pathlib.Path, key: dict[str, str]) -> dict:
    """A rater's rating file, checked: exactly the grids of `key`, each rated once with well-formed fields."""

    def refuse_duplicates(pairs):
        names = [name for name, _ in pairs]
        if len(set(names)) < len(names):
            raise ValueError(f"{source} rates a grid twice: {sorted(names)}.")
        return dict(pairs)

    try:
        rating = json.loads(source.read_text(), object_pairs_hook=refuse_duplicates)
    except json.JSONDecodeError as error:
        raise ValueError(f"{source} is not valid JSON: {error}.") from None
    if not isinstance(rating, dict) or set(rating) != set(key):
        raise ValueError(f"{source} must rate exactly the grids the rater was given: {sorted(key)}.")
    return {grid_file: check_entry(entry, f"{source}: {grid_file}") for grid_file, entry in rating.items()}


def check_entry(entry, where: str) -> dict:
    """One grid's rating with only the fields the counts file keeps, or ValueError saying what is wrong."""
    if not isinstance(entry, dict) or not all(is_count(entry.get(field)) for field in COUNT_FIELDS):
        raise ValueError(f"{where} needs whole numbers 'clearly_broken' and 'borderline', got {entry!r}.")
    if not isinstance(entry.get("note"), str):
        raise ValueError(f"{where} needs a one-sentence 'note'.")
    positions = entry.get("broken_positions")
    inside = isinstance(positions, list) and all(
        isinstance(p, list) and len(p) == 2 and all(is_count(v) and 1 <= v <= GRID_SIDE for v in p) for p in positions)
    if not inside or len(positions) != entry["clearly_broken"] or len({tuple(p) for p in positions}) < len(positions):
        raise ValueError(f"{where} needs one distinct [row, column] (1-{GRID_SIDE}) per clearly broken face: "
                         f"{entry['clearly_broken']} broken, positions {positions}.")
    return {"clearly_broken": entry["clearly_broken"], "borderline": entry["borderline"],
            "broken_positions": positions, "note": entry["note"]}


def new_ratings(out_dir: pathlib.Path, document: dict) -> dict[str, dict[str, dict]]:
    """{grid name: {rater: entry}} of the ratings in `out_dir` not yet in the counts `document`."""
    keys = files.read_json(out_dir / "keys.json")
    merged = raters_in(document)
    found = {}
    for rater in sorted(keys, key=lambda name: int(name[5:])):
        source = out_dir / rater / "rating.json"
        if not source.is_file():
            continue
        entries = {keys[rater][grid_file]: {"grid_file": grid_file, **entry}
                   for grid_file, entry in read_rating(source, keys[rater]).items()}
        if rater in merged:
            if all(document["counts"].get(name, {}).get(rater) == entry for name, entry in entries.items()):
                continue  # merged before, as it is
            raise ValueError(f"The counts file already holds other counts by {rater}; give new raters new numbers.")
        for name, entry in entries.items():
            found.setdefault(name, {})[rater] = entry
    return found


def merge(out_dir: pathlib.Path, counts_path=COUNTS, what: str | None = None) -> None:
    """Add the new ratings in `out_dir` to the counts file; `what` (who rated which grids) extends its description,
    unless the description holds it already, and is required when a grid is new to the file."""
    document = read_counts(counts_path)
    found = new_ratings(out_dir, document)
    if not found:
        print("new_ratings 0")
        return
    new_grids = sorted(set(found) - set(document["counts"]))
    if new_grids and not what:
        raise ValueError(f"New grids {new_grids}: say what they are with --what (model, sampler, seeds, section).")
    for name, ratings in found.items():
        document["counts"].setdefault(name, {}).update(ratings)
    if what and what not in document["what"]:  # one round merged from several folders is described once
        document["what"] = f"{document['what']} {what}"
    files.write_text(counts_path, counts_json(document) + "\n")
    for name, ratings in sorted(found.items()):
        for rater, entry in ratings.items():
            print(f"{name}_{rater} {entry['clearly_broken']}")
        print(f"{name}_mean {sum(e['clearly_broken'] for e in ratings.values()) / len(ratings):.2f}")


def counts_json(value, depth: int = 0) -> str:
    """JSON as the counts file keeps it: one key per line, indented by one space a level, lists on one line
    (a rater's positions stay readable as `[[2, 8], [4, 4]]`)."""
    if isinstance(value, dict) and value:
        pad = " " * (depth + 1)
        items = [f"{pad}{json.dumps(key)}: {counts_json(item, depth + 1)}" for key, item in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * depth + "}"
    return json.dumps(value)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    counts = argparse.ArgumentParser(add_help=False)
    counts.add_argument("--counts", type=pathlib.Path, default=COUNTS, help="the counts file")
    commands = parser.add_subparsers(dest="command", required=True)
    prepare_parser = commands.add_parser("prepare", parents=[counts],
                                         help="one folder of renamed grids and one prompt per rater")
    prepare_parser.add_argument("--out_dir", type=pathlib.Path, required=True, help="outside the repository")
    prepare_parser.add_argument("--raters", required=True, help="new rater numbers: 116 or 116-118")
    prepare_parser.add_argument("grids", nargs="+", help="name=grid.png: the name the counts are kept under")
    merge_parser = commands.add_parser("merge", parents=[counts], help="add the raters' counts to the counts file")
    merge_parser.add_argument("--out_dir", type=pathlib.Path, required=True, help="the folder `prepare` wrote")
    merge_parser.add_argument("--what", help="appended to the counts file's description: which raters rated which "
                              "grids (model, sampler, seeds), with the REPORT.md section")
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            prepare(args.out_dir, parse_raters(args.raters), parse_grids(args.grids), args.counts)
        else:
            merge(args.out_dir, args.counts, args.what)
    except (ValueError, OSError) as error:
        sys.exit(f"blind_rating.py {args.command}: {error}")


if __name__ == "__main__":
    main()
