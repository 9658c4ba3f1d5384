"""Paired comparisons over seeds for named claims of a study (mtpeft.app.significance): one sentence each.

    python scripts/significance.py results/study-encoder/results.json mtl_lora:lora cpoly:poly:multiemo

Each claim is A:B (the average over tasks) or A:B:TASK; A and B are rows of the study's results.json.
"""

import argparse
import json
from pathlib import Path

from mtpeft.app.significance import claim, paired_difference


def claim_line(table: dict, spec: str) -> str:
    a, b, *column = spec.split(":")
    column = column[0] if column else "average"
    for name in (a, b):
        if name not in table:
            raise SystemExit(f"no row {name!r} in the study; its rows are {sorted(table)}.")
    scores = [table[name]["per_seed"]["average"] if column == "average" else table[name]["per_seed"]["tasks"].get(column)
              for name in (a, b)]
    if None in scores:
        raise SystemExit(f"no column {column!r}; the tasks are {sorted(table[a]['per_seed']['tasks'])}.")
    result = paired_difference(*scores)
    if result is None:
        return f"{a} vs {b} on {column}: fewer than two shared seeds, nothing to compare."
    return claim(a, b, column, result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a study's results.json")
    parser.add_argument("claims", nargs="+", help="A:B or A:B:TASK")
    args = parser.parse_args()
    table = json.loads(Path(args.results).read_text())
    for spec in args.claims:
        print(claim_line(table, spec))


if __name__ == "__main__":
    main()
