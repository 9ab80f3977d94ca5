"""`python -m cmb.eval RUN_DIR`: recompute results.json, froc.png and report.md of a finished run."""

from __future__ import annotations

import argparse
import sys

from cmb.errors import CMBError
from cmb.eval.evaluate import evaluate_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cmb.eval", description=__doc__)
    parser.add_argument("run_dir")
    args = parser.parse_args(argv)
    try:
        results = evaluate_run(args.run_dir)
    except CMBError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    ch = results["chosen_operating_point"]
    print(f"stage 1 @ {results['stage1']['threshold']}: sensitivity {results['stage1']['sensitivity']:.3f}, "
          f"{results['stage1']['fp_per_scan']:.2f} FP/scan")
    print(f"two-stage @ {ch['threshold']}: sensitivity {ch['sensitivity']:.3f}, {ch['fp_per_scan']:.2f} FP/scan; CPM {results['froc']['cpm']:.3f}")
    print(f"written: {args.run_dir}/results.json, report.md, froc.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
