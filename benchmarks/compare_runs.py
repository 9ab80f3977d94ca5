"""Compare two run folders of the same command (e.g. an uninterrupted run and one killed and resumed):

    python benchmarks/compare_runs.py runs/a runs/b

Prints whether results.json (timing aside), every member's model files (tensors, bit for bit),
done.json (training seconds aside), metrics.csv and the out-of-fold, mimic and truth files are
equal; exit status 1 when anything differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def _json(path: Path, drop: tuple[str, ...]) -> dict:
    data = json.loads(path.read_text())
    for key in drop:
        data.pop(key, None)
    return data


def _same_model(a: Path, b: Path) -> bool:
    x = torch.load(a, map_location="cpu", weights_only=True)["state_dict"]
    y = torch.load(b, map_location="cpu", weights_only=True)["state_dict"]
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def compare(a: Path, b: Path) -> list[str]:
    """One line per kind of file: how many are equal; lines starting with 'DIFFERS' name what is not."""
    lines = []

    def report(kind: str, names: list[Path], equal) -> None:
        bad = [str(n) for n in names if not (b / n).is_file() or not equal(a / n, b / n)]
        lines.append(f"{kind}: {len(names) - len(bad)}/{len(names)} equal")
        lines.extend(f"DIFFERS {n}" for n in bad)

    rel = lambda pattern: sorted(p.relative_to(a) for p in a.glob(pattern))  # noqa: E731
    report("results.json (timing aside)", [Path("results.json")], lambda x, y: _json(x, ("timing_s",)) == _json(y, ("timing_s",)))
    report("model files (bit for bit)", rel("fold_*/*_bs*/model*.pt"), _same_model)
    report("done.json (train seconds aside)", rel("fold_*/*_bs*/done.json"),
           lambda x, y: _json(x, ("train_seconds",)) == _json(y, ("train_seconds",)))
    report("metrics.csv", rel("fold_*/*_bs*/*metrics.csv"), lambda x, y: x.read_bytes() == y.read_bytes())
    report("out-of-fold, mimic and truth files", [p for p in rel("fold_*/*/*") if p.suffix in (".csv", ".json") and "_bs" not in str(p)],
           lambda x, y: x.read_bytes() == y.read_bytes())
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/compare_runs.py", description=__doc__.splitlines()[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    args = parser.parse_args(argv)
    for run in (args.run_a, args.run_b):
        if not (run / "results.json").is_file():
            print(f"error: {run}: not a finished run folder (no results.json)", file=sys.stderr)
            return 2
    lines = compare(args.run_a, args.run_b)
    print("\n".join(lines))
    return 1 if any(line.startswith("DIFFERS") for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
