"""report.md and froc.png of an evaluated run (from its results dictionary), with published baselines."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import yaml

from cmb.eval.bootstrap import BootstrapResult
from cmb.eval.froc import CPM_RATES, FROCCurve, best_threshold

PAPER_BUDGET_FP = 14.5  # Rau et al.'s lower-threshold operating point (97.5% at 14.5 FP/scan)
METRIC_KINDS = {"froc": "sensitivity and false positives per scan", "f1": "per-scan precision, recall and F1 (VALDO Task 2 style)"}


def load_baselines() -> list[dict]:
    """Rows of `cmb/eval/baselines.yaml` (each names its dataset, protocol and metric kind)."""
    text = resources.files("cmb.eval").joinpath("baselines.yaml").read_text()
    return yaml.safe_load(text) or []


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _fp(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _ci(interval: list[float] | None, fmt) -> str:  # noqa: ANN001 (one of _pct, _fp)
    return "" if not interval else f" [{fmt(interval[0])}, {fmt(interval[1])}]"


def _visible_low(curve: FROCCurve, x_min: float = 1e-2) -> float:
    """Lowest sensitivity the step curve shows from `x_min` FP/scan on (curves rise with FP/scan)."""
    fp, sens = np.asarray(curve.fp_per_scan), np.asarray(curve.sensitivity)
    if len(sens) == 0:
        return 0.0
    before = np.flatnonzero(fp <= x_min)
    return float(sens[before[-1]] if len(before) else sens[0])


def sensitivity_floor(lows: list[float], margin: float = 0.05) -> float:
    """Lower end of the sensitivity axis: `margin` below the lowest value shown, down to a multiple of 0.05, >= 0."""
    low = min(lows) if lows else 0.0
    return max(0.0, float(np.floor((low - margin) / 0.05) * 0.05))


def _short_name(method: str) -> str:
    """'Rau et al. 2026 (Brain ...), final' -> 'Rau et al. 2026, final': the label beside a baseline's marker."""
    head, _, rest = method.partition(" (")
    tail = rest.split("), ", 1)[1] if "), " in rest else ""
    name = f"{head}, {tail}" if tail else head
    return name if len(name) <= 28 else name[:27] + "…"


def plot_froc(stage1: FROCCurve, two_stage: FROCCurve, path: Path, results: dict, boot: BootstrapResult | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    level = results.get("confidence_intervals", {}).get("level", 0.95)
    for curve, stage, label, colour in ((stage1, "stage1", "stage 1 (U-Net ensemble)", "tab:orange"),
                                         (two_stage, "two_stage", "two-stage (U-Nets + CNNs)", "tab:blue")):
        x = np.maximum(curve.fp_per_scan, 1e-2)
        ax.step(x, curve.sensitivity, where="post", label=label, color=colour)
        if boot is not None:
            lo, hi = boot.bands[stage]
            reach = boot.band_rates <= max(curve.max_fp_per_scan, 1e-2)
            ax.fill_between(boot.band_rates[reach], lo[reach], hi[reach], color=colour, alpha=0.18, linewidth=0,
                            label=f"{label.split(' (')[0]}: {100 * level:.0f}% bootstrap band")
    shown = [b for b in load_baselines()
             if b.get("metric", "froc") == "froc" and b.get("sensitivity") is not None and b.get("fp_per_scan") is not None]
    for b in shown:
        ax.scatter([b["fp_per_scan"]], [b["sensitivity"]], marker="s" if b.get("stage") == "stage1" else "*", s=60, color="grey",
                   edgecolor="k", zorder=5, alpha=0.8)
        ax.annotate(_short_name(b["method"]), (b["fp_per_scan"], b["sensitivity"]), textcoords="offset points", xytext=(4, -9),
                    fontsize=6, color="dimgrey")
    ax.scatter([], [], marker="*", color="grey", edgecolor="k", label="published operating points (other data)")
    chosen, nested = results["chosen_operating_point"], results.get("nested_operating_point")
    ax.scatter([max(chosen["fp_per_scan"], 1e-2)], [chosen["sensitivity"]], marker="o", facecolor="none", edgecolor="red", s=120,
               zorder=6, label=f"ours, in-sample threshold {chosen['threshold']:g}")
    if nested:
        ax.scatter([max(nested["fp_per_scan"], 1e-2)], [nested["sensitivity"]], marker="D", facecolor="none", edgecolor="darkred",
                   s=80, zorder=6, label="ours, nested thresholds")
    ax.set_xscale("log")
    ax.set_xlim(1e-2, max(100.0, float(stage1.fp_per_scan.max()) * 1.2))
    lows = [_visible_low(stage1), _visible_low(two_stage)] + [float(b["sensitivity"]) for b in shown]
    lows += [p["sensitivity"] for p in (chosen, nested) if p]
    if boot is not None:
        lows += [float(np.min(boot.bands[stage][0])) for stage in ("stage1", "two_stage")]
    ax.set_ylim(sensitivity_floor(lows), 1.02)  # zoomed to the range the curves, bands and points use
    ax.set_xlabel("false positives per scan (log)")
    ax.set_ylabel("sensitivity")
    d = results["dataset"]
    source = "another run's models" if results.get("transfer_operating_point") else "out-of-fold"
    ax.set_title(f"FROC, {source}: {d['name']} ({d['n_scans']} scans, {d['n_cmbs']} CMBs)\n"
                 f"CPM (mean sensitivity at 1/8, 1/4, ..., 8 FP/scan, in-sample curve): two-stage {results['froc']['cpm']:.3f}, "
                 f"stage 1 {results['stage1']['cpm']:.3f}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _operating_rows(results: dict) -> list[tuple[str, str, float | None, float, float, list | None, list | None]]:
    s1, ch, nested = results["stage1"], results["chosen_operating_point"], results.get("nested_operating_point")
    ci = results.get("confidence_intervals", {})
    rows = []
    transfer = results.get("transfer_operating_point")
    if transfer:
        t_ci = ci.get("transfer_operating_point", {})
        rows.append(("two-stage at the scored run's own threshold", "transfer (honest)", transfer["threshold"], transfer["sensitivity"],
                     transfer["fp_per_scan"], t_ci.get("sensitivity"), t_ci.get("fp_per_scan")))
    if nested:
        n_ci = ci.get("nested_operating_point", {})
        rows.append((f"two-stage, {nested['rule']}", "nested (honest)", None, nested["sensitivity"], nested["fp_per_scan"],
                     n_ci.get("sensitivity"), n_ci.get("fp_per_scan")))
    c_ci = ci.get("chosen_operating_point", {})
    budget = "" if ch.get("within_budget", True) else " (NOT within the budget)"
    default = "" if transfer else "; infer.py's default"
    rows.append((f"two-stage, {ch['rule']}{budget}{default}", "in-sample", ch["threshold"], ch["sensitivity"], ch["fp_per_scan"],
                 c_ci.get("sensitivity"), c_ci.get("fp_per_scan")))
    for fp, why in ((8.0, ""), (PAPER_BUDGET_FP, " (the paper's budget: Rau et al. 97.5% at 14.5)")):
        p = best_threshold(results["operating_points"], fp)
        if p is not None:
            rows.append((f"two-stage, best at <= {fp:g} FP/scan{why}", "in-sample", p["threshold"], p["sensitivity"], p["fp_per_scan"], None, None))
    s1_ci = ci.get("stage1", {})
    rows.append((f"stage 1 only, all candidates (threshold {s1['threshold']:g})", "fixed", s1["threshold"], s1["sensitivity"],
                 s1["fp_per_scan"], s1_ci.get("sensitivity"), s1_ci.get("fp_per_scan")))
    b = s1["best_at_budget"]
    rows.append((f"stage 1 only, best at <= {b['max_fp_per_scan']:g} FP/scan", "in-sample", b["threshold"], b["sensitivity"],
                 b["fp_per_scan"], None, None))
    return rows


def _froc_table(results: dict) -> list[str]:
    ci = results.get("confidence_intervals", {})
    rates = [f"{r:g}" for r in CPM_RATES]
    lines = ["| FP/scan | " + " | ".join(rates) + " | CPM |", "|---|" + "---|" * (len(rates) + 1)]
    for name, key, block in (("two-stage", "froc", results["froc"]), ("stage 1", "stage1_froc", results["stage1"])):
        reach = block.get("max_fp_per_scan_reached", np.inf)
        bounds = ci.get(key, {})
        cells = []
        for r in rates:
            mark = "†" if float(r) > reach else ""
            cells.append(f"{_pct(block['sensitivity_at_fp'][r])}{mark}{_ci(bounds.get('sensitivity_at_fp', {}).get(r), _pct)}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {block['cpm']:.3f}{_ci(bounds.get('cpm'), lambda v: f'{v:.3f}')} |")
    return lines


def _summary_lines(results: dict) -> list[str]:
    s1, two = results["stage1"], results["froc"]
    lines = []
    if s1["cpm"] > two["cpm"]:
        lines.append(f"**Stage 1 alone beats the two-stage result on this run** (stage-1 CPM {s1['cpm']:.3f} against two-stage "
                     f"{two['cpm']:.3f}): stage 2 drops CMBs that stage 1 finds or adds nothing at these FP rates.")
    keep = results.get("stage2_keep_rate", {})
    point = "transfer" if "transfer" in keep else "nested" if "nested" in keep else "chosen"
    if keep.get(point, {}).get("rate") is not None:
        k = keep[point]
        lines.append(f"Stage 2 keeps {_pct(k['rate'])} ({k['kept']} of {k['found_by_stage1']}) of the CMBs stage 1 finds at "
                     f"{s1['threshold']:g}, at the {point} point.")
    transfer = results.get("transfer_operating_point")
    if transfer:
        lines.append(f"Scored run `{transfer['scored_run']}` ({transfer['members']}) on data it never saw, at its own threshold "
                     f"{transfer['threshold']:g}: **{_pct(transfer['sensitivity'])} at {_fp(transfer['fp_per_scan'])} FP/scan** "
                     f"({transfer['tp']} of {results['dataset']['n_cmbs']} CMBs); the in-sample point below chose its threshold on these scans.")
    nested = results.get("nested_operating_point")
    if nested:
        lines.append(f"Honest (nested) two-stage point: **{_pct(nested['sensitivity'])} at {_fp(nested['fp_per_scan'])} FP/scan** "
                     f"({nested['tp']} of {results['dataset']['n_cmbs']} CMBs); the in-sample point below chose its threshold on the same scans.")
    return lines


def _per_scan_lines(results: dict) -> list[str]:
    summary = results.get("per_scan_summary", {})
    lines = ["| point | precision | recall | F1 | abs(detected - true) |", "|---|---|---|---|---|"]

    def cell(block: dict, pct: bool) -> str:
        if block["median"] is None:
            return "–"
        f = _pct if pct else (lambda v: f"{v:.1f}")
        return f"{f(block['median'])} [{f(block['q25'])}, {f(block['q75'])}] (n={block['n_scans']})"

    for name, key in (("two-stage, nested", "nested"), ("two-stage, in-sample", "chosen")):
        if key in summary:
            s = summary[key]
            lines.append(f"| {name} | {cell(s['precision'], True)} | {cell(s['recall'], True)} | {cell(s['f1'], True)} | "
                         f"{cell(s['count_abs_diff'], False)} |")
    return lines


def _size_lines(results: dict) -> list[str]:
    by_size = results.get("sensitivity_by_size", {})
    names = [("stage1", "stage 1 (all candidates)"), ("two_stage_nested", "two-stage, nested"), ("two_stage_chosen", "two-stage, in-sample")]
    bins = list(next(iter(by_size.values()), {}))
    lines = ["| point | " + " | ".join(bins) + " |", "|---|" + "---|" * len(bins)]
    for key, label in names:
        if key in by_size:
            cells = [f"{_pct(v['sensitivity'])} ({v['found']}/{v['n_cmbs']})" for v in by_size[key].values()]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _baseline_lines() -> list[str]:
    rows = load_baselines()
    lines = []
    for kind, title in METRIC_KINDS.items():
        mine = [b for b in rows if b.get("metric", "froc") == kind]
        if not mine:
            continue
        lines += ["", f"### {title[0].upper() + title[1:]}", ""]
        if kind == "froc":
            lines += ["| method | dataset | protocol | sensitivity | FP/scan | note |", "|---|---|---|---|---|---|"]
            lines += [f"| {b['method']} | {b.get('dataset', '')} | {b.get('protocol', '')} | {_pct(b.get('sensitivity'))} | "
                      f"{_fp(b.get('fp_per_scan'))} | {b.get('note', '')} |" for b in mine]
        else:
            lines += ["| method | dataset | protocol | precision | recall | F1 | note |", "|---|---|---|---|---|---|---|"]
            lines += [f"| {b['method']} | {b.get('dataset', '')} | {b.get('protocol', '')} | {_pct(b.get('precision'))} | "
                      f"{_pct(b.get('recall'))} | {_pct(b.get('f1'))} | {b.get('note', '')} |" for b in mine]
    return lines


def report_markdown(results: dict) -> str:
    d, ci = results["dataset"], results.get("confidence_intervals", {})
    level = f"{100 * ci.get('level', 0.95):.0f}%"
    how = (f"Models of another run scored on {d['n_scans']} scans they never saw" if results["protocol"]["cv"] == "transfer" else
           f"Out-of-fold results of {results['protocol']['n_folds']}-fold cross-validation on {d['n_scans']} scans")
    lines = [f"# CMB detection report: {d['name']}", "",
             f"{how} with {d['n_cmbs']} CMBs (one CMB = {100 / max(d['n_cmbs'], 1):.1f} points of sensitivity). No model saw the "
             f"scan it is scored on. Candidates: {results['candidates']['definition']} (threshold "
             f"{results['candidates']['stage1_threshold']:g}), the same candidates infer.py deploys.", ""]
    lines += _summary_lines(results)
    lines += ["", "## Operating points", "",
              f"*nested*: each fold's threshold was chosen on the other folds only. *in-sample*: the threshold was chosen on these same "
              f"out-of-fold predictions, so the figure is optimistic. *fixed*: no choice. Brackets: {level} bootstrap interval over scans "
              f"({ci.get('n_resamples', 0)} resamples, seed {ci.get('seed')}).", "",
              "| point | selection | threshold | sensitivity | FP/scan |", "|---|---|---|---|---|"]
    for name, sel, thr, sens, fp, s_ci, f_ci in _operating_rows(results):
        thr_text = "per fold" if thr is None else f"{thr:g}"
        lines.append(f"| {name} | {sel} | {thr_text} | {_pct(sens)}{_ci(s_ci, _pct)} | {_fp(fp)}{_ci(f_ci, _fp)} |")
    nested = results.get("nested_operating_point")
    if nested:
        lines += ["", "Nested thresholds per fold: " + ", ".join(
            f"fold {f['fold']}: {f['threshold']:g}{'' if f['within_budget'] else ' (over budget)'}" for f in nested["per_fold"]) + "."]
    lines += ["", "## FROC", "",
              f"Sensitivity at 1/8 … 8 FP/scan (in-sample curve, the standard reading) and CPM, their mean, with {level} intervals. "
              f"† marks rates beyond the curve's end (two-stage {_fp(results['froc']['max_fp_per_scan_reached'])}, stage 1 "
              f"{_fp(results['stage1']['max_fp_per_scan_reached'])} FP/scan): sensitivity there is held at its last value "
              "(LUNA16/MONAI convention).", ""]
    lines += _froc_table(results)
    lines += ["", "## Per-scan figures (VALDO Task 2 style)", "",
              "Median [IQR] over scans. " + results.get("per_scan_summary", {}).get("conventions", "") + ".", ""]
    lines += _per_scan_lines(results)
    lines += ["", "## Sensitivity by CMB size", "", "Equivalent-sphere diameter of each CMB's label component.", ""]
    lines += _size_lines(results)
    lines += ["", "## Published baselines", "",
              "These numbers come from other data than ours (mostly real clinical SWI; ours may be synthetic), under other protocols. "
              "The tables compare operating points, not head-to-head runs, and a per-scan F1 is not comparable with a sensitivity at "
              "an FP rate. Rows live in `cmb/eval/baselines.yaml`."]
    lines += _baseline_lines()
    t = results["timing_s"]
    lines += ["", "## Timing", "", f"preprocessing {t['preprocess']:.0f} s, training {t['train']:.0f} s, "
              f"inference {t['inference_per_scan']:.1f} s per held-out scan (both stages, after preprocessing)"
              + (f", whole protocol {t['protocol_wall']:.0f} s" if t.get("protocol_wall") else "") + ".", ""]
    return "\n".join(lines)
