"""`python -m cmb.eval RUN_DIR`: recompute results.json, froc.png and report.md of a finished run."""

from __future__ import annotations

import argparse
import sys

from cmb.errors import CMBError
from cmb.eval.evaluate import evaluate_run, summary_lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cmb.eval", description=__doc__)
    parser.add_argument("run_dir")
    args = parser.parse_args(argv)
    try:
        results = evaluate_run(args.run_dir)
    except CMBError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary_lines(results))
    print(f"written: {args.run_dir}/results.json, operating_points.csv, report.md, froc.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
