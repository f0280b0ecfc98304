"""Count broken faces blind: hand grids to raters under random names, then merge their counts (REPORT.md 6.14).

    python bench/blind_rating.py prepare --out_dir=/tmp/blind --raters=116-118 \\
        edm_s0=runs/a/edm_s0.png ode_s0=runs/a/ode_s0.png real_heldout_0_63=runs/real_0_63.png
    # give each rater (a new helper session that sees nothing else) /tmp/blind/rater<N>_prompt.txt
    python bench/blind_rating.py merge --out_dir=/tmp/blind --what="Raters 116-118 (REPORT.md 6.21) rated ..."

`prepare` copies the grids into one folder per rater, `<out_dir>/rater<N>/grid_<letter>.png`, shuffled anew for
each rater (seeded by the rater's number, so a round can be rebuilt), and writes the key, which no rater sees, to
`<out_dir>/keys.json`. Each rater's prompt (`bench/blind_rater_prompt.txt` with its folder filled in) describes
what counts as clearly broken and asks for `<out_dir>/ratings/rater<N>.json`. `merge` checks every rating against
the key (each grid rated once; as many positions as clearly broken faces, all inside the 8x8 grid) and adds it to
the counts file under the grid's real name, refusing a rater that is already there. It prints `key value` lines:
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
GRID_SIDE = 8  # the grids are 8x8 tiles: `python sample.py`'s 64 images
FIELDS = {"clearly_broken": int, "borderline": int, "broken_positions": list, "note": str}


def parse_raters(text: str) -> list[int]:
    """'116-118' -> [116, 117, 118]; '116' -> [116]."""
    first, _, last = text.partition("-")
    try:
        numbers = list(range(int(first), int(last or first) + 1))
    except ValueError:
        numbers = []
    if not numbers:
        raise ValueError(f"--raters takes a number or a range like 116-118, got {text!r}.")
    return numbers


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


def blind_names(names: list[str], rater: int) -> dict[str, str]:
    """{'grid_<letter>.png': name}: the grids under random letters, the same for the same rater number."""
    letters = random.Random(rater).sample(string.ascii_uppercase, len(names))
    return {f"grid_{letter}.png": name for letter, name in sorted(zip(letters, names))}


def prepare(out_dir: pathlib.Path, raters: list[int], grids: dict[str, pathlib.Path]) -> None:
    keys_path = out_dir / "keys.json"
    keys = files.read_json(keys_path) if keys_path.is_file() else {}
    taken = [f"rater{rater}" for rater in raters if f"rater{rater}" in keys or (out_dir / f"rater{rater}").exists()]
    if taken:
        raise FileExistsError(f"{', '.join(taken)} already prepared in {out_dir}; choose new rater numbers.")
    template = PROMPT.read_text()
    (out_dir / "ratings").mkdir(parents=True, exist_ok=True)
    for rater in raters:
        key = blind_names(list(grids), rater)
        folder = out_dir / f"rater{rater}"
        folder.mkdir()
        for blind_name, name in key.items():
            shutil.copyfile(grids[name], folder / blind_name)
        prompt = template.format(folder=folder.resolve(), count=len(key), grid_files=", ".join(key),
                                 output=(out_dir / "ratings" / f"rater{rater}.json").resolve())
        files.write_text(out_dir / f"rater{rater}_prompt.txt", prompt)
        keys[f"rater{rater}"] = key
        print(f"rater{rater}_prompt {out_dir / f'rater{rater}_prompt.txt'}")
    files.write_json(keys_path, keys)


def check_rating(rating: dict, key: dict[str, str], source: pathlib.Path) -> None:
    """Raise ValueError unless `rating` rates exactly the grids of `key`, each with well-formed fields."""
    if set(rating) != set(key):
        raise ValueError(f"{source} rates {sorted(rating)}; the rater was given {sorted(key)}.")
    for grid_file, entry in rating.items():
        for field, kind in FIELDS.items():
            if not isinstance(entry.get(field), kind):
                raise ValueError(f"{source}: {grid_file} needs {field!r} as {kind.__name__}, got {entry.get(field)!r}.")
        positions = entry["broken_positions"]
        inside = all(isinstance(p, list) and len(p) == 2 and all(1 <= v <= GRID_SIDE for v in p) for p in positions)
        if not inside or len(positions) != entry["clearly_broken"]:
            raise ValueError(f"{source}: {grid_file} needs one [row, column] (1-{GRID_SIDE}) per clearly broken "
                             f"face: {entry['clearly_broken']} broken, positions {positions}.")


def counts_json(value, depth: int = 0) -> str:
    """JSON as the counts file keeps it: one key per line, indented by one space a level, lists on one line
    (a rater's positions stay readable as `[[2, 8], [4, 4]]`)."""
    if isinstance(value, dict) and value:
        pad = " " * (depth + 1)
        items = [f"{pad}{json.dumps(key)}: {counts_json(item, depth + 1)}" for key, item in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * depth + "}"
    return json.dumps(value)


def merge(out_dir: pathlib.Path, counts_path: pathlib.Path, what: str | None = None) -> None:
    """Add the ratings in `out_dir`/ratings to the counts file; `what` (who rated which grids) extends its
    description."""
    keys = files.read_json(out_dir / "keys.json")
    document = files.read_json(counts_path)
    merged = {}
    for source in sorted((out_dir / "ratings").glob("rater*.json")):
        rater = source.stem
        if rater not in keys:
            raise ValueError(f"{source}: {rater} is not in {out_dir / 'keys.json'}.")
        rating = json.loads(source.read_text())
        check_rating(rating, keys[rater], source)
        for grid_file, entry in rating.items():
            name = keys[rater][grid_file]
            if rater in document["counts"].get(name, {}):
                raise ValueError(f"{counts_path} already holds {rater}'s count of {name}; give new raters new "
                                 "numbers.")
            merged.setdefault(name, {})[rater] = {"grid_file": grid_file, **entry}
    if not merged:
        raise FileNotFoundError(f"No ratings in {out_dir / 'ratings'}: each rater writes rater<N>.json there.")
    for name, ratings in merged.items():
        document["counts"].setdefault(name, {}).update(ratings)
    if what:
        document["what"] = f"{document['what']} {what}"
    files.write_text(counts_path, counts_json(document) + "\n")
    for name, ratings in sorted(merged.items()):
        for rater, entry in ratings.items():
            print(f"{name}_{rater} {entry['clearly_broken']}")
        print(f"{name}_mean {sum(e['clearly_broken'] for e in ratings.values()) / len(ratings):.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prepare_parser = commands.add_parser("prepare", help="one folder of renamed grids and one prompt per rater")
    prepare_parser.add_argument("--out_dir", type=pathlib.Path, required=True, help="outside the repository")
    prepare_parser.add_argument("--raters", required=True, help="rater numbers: 116 or 116-118")
    prepare_parser.add_argument("grids", nargs="+", help="name=grid.png: the name the counts are kept under")
    merge_parser = commands.add_parser("merge", help="add the raters' counts to the counts file")
    merge_parser.add_argument("--out_dir", type=pathlib.Path, required=True, help="the folder `prepare` wrote")
    merge_parser.add_argument("--counts", type=pathlib.Path, default=common.REPO / "docs" / "blind_counts.json")
    merge_parser.add_argument("--what", help="appended to the counts file's description: which raters rated which "
                              "grids (model, sampler, seeds), with the REPORT.md section")
    args = parser.parse_args()
    try:
        if args.command == "prepare":
            prepare(args.out_dir, parse_raters(args.raters), parse_grids(args.grids))
        else:
            merge(args.out_dir, args.counts, args.what)
    except (ValueError, OSError) as error:
        sys.exit(f"blind_rating.py {args.command}: {error}")


if __name__ == "__main__":
    main()
