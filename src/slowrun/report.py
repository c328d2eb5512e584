"""`slowrun report`: a static HTML page with PNG plots, readable from disk with no server.

Plots: train/val loss of each run by step and by epoch (the final evaluation of the
variant the run chose included); the baseline curve with the runs placed on it (their data
efficiency shown); the per-K curve of each ensemble; a records table; the CPU track's curves
and entries from its results file; an ablation's deltas. Every number in
the page's tables is taken from the JSON files it cites. A run still in progress (no
result.json yet) gets its plots from metrics.jsonl and no final numbers.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

from . import SlowrunError
from .efficiency import Curve, EfficiencyError, describe_efficiency, describe_fit, place
from .records import track_records
from .results import chosen, is_ensemble, read_result
from .rundir import CONFIG, METRICS, RESULT, RunDir
from .runlog import fmt_time, read_metrics
from .storage import atomic_write_text, read_json


class ReportError(SlowrunError):
    pass


def _plt():
    import matplotlib  # ~1 s, and only a report with plots needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _metrics(run: Path) -> tuple[list[dict], list[dict]]:
    train, evals = [], []
    if RunDir(run).metrics.is_file():
        seen: dict[tuple, dict] = {}
        for rec in read_metrics(run):
            if not isinstance(rec.get("step"), int):  # a foreign line
                continue
            seen[(rec.get("kind"), rec.get("step"), rec.get("at"))] = rec  # a resumed run's repeats: keep the last
        for (kind, _, _), rec in sorted(seen.items(), key=lambda kv: kv[1].get("step", 0)):
            (train if kind == "train" else evals).append(rec)
    return train, evals


def _fmt(x, digits=4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return html.escape(str(x))


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _smooth(ys: list[float], k: int = 10) -> list[float]:
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc = y if i == 0 else acc + (y - acc) / min(i + 1, k)
        out.append(acc)
    return out


def _final_point(result: dict | None) -> tuple[str, float] | None:
    """(variant, val loss) of the final evaluation of a finished single run."""
    if not result or is_ensemble(result):
        return None
    name, losses = chosen(result)
    return name, losses["val_loss"]


def val_by_epoch(run: Path, result: dict | None) -> tuple[list[float], list[float], str | None]:
    """(epochs, val losses, final variant): the periodic evaluations, then the final
    evaluation of the variant the run chose (None while the run is in progress)."""
    _, evals = _metrics(run)
    epochs, losses = [r["epoch"] for r in evals], [r["val_loss"] for r in evals]
    final = _final_point(result)
    if final is None:
        return epochs, losses, None
    return epochs + [result["epochs"]], losses + [final[1]], final[0]


def loss_curves(runs: list[Path], results: dict[Path, dict | None], out: Path) -> list[str]:
    """Two PNGs: loss by step, and val loss by epoch; a finished run's final evaluation (the
    variant it chose) is the last val point, drawn as a star."""
    plt = _plt()
    files = []
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for run in runs:
        train, evals = _metrics(run)
        final, result = _final_point(results[run]), results[run]
        if train:
            line, = ax.plot([r["step"] for r in train], _smooth([r["loss"] for r in train]), lw=1, label=f"{run.name} train")
            if evals:
                ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o--", color=line.get_color(), ms=3,
                        label=f"{run.name} val")
            if final:
                ax.plot([result["steps"]], [final[1]], "*", color=line.get_color(), ms=10, label=f"{run.name} final ({final[0]})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("training loss (smoothed) and val loss by step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss_by_step.png", dpi=110)
    plt.close(fig)
    files.append("loss_by_step.png")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for run in runs:
        epochs, losses, final = val_by_epoch(run, results[run])
        if epochs:
            line, = ax.plot(epochs, losses, "-", label=run.name + (f" (last point: final {final})" if final else ""))
            n = len(epochs) - (1 if final else 0)
            ax.plot(epochs[:n], losses[:n], "o", ms=3, color=line.get_color())
            if final:
                ax.plot(epochs[-1:], losses[-1:], "*", ms=10, color=line.get_color())
    ax.set_xlabel("epoch")
    ax.set_ylabel("val loss")
    ax.set_title("val loss by epoch")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "val_by_epoch.png", dpi=110)
    plt.close(fig)
    files.append("val_by_epoch.png")
    return files


def _run_loss(result: dict, metric: str) -> float | None:
    return chosen(result)[1].get(f"{metric}_loss")


def _save_tokens_plot(fig, ax, metric: str, title: str, out: Path, name: str) -> str:
    """Finish a loss-against-baseline-tokens plot (log tokens, grid, legend) and write it as `name`."""
    plt = _plt()
    ax.set_xscale("log")
    ax.set_xlabel("baseline training tokens")
    ax.set_ylabel(f"{metric} loss")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def curve_plot(curve: Curve, placed: list[tuple[str, float, float | None]], out: Path, metric: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(curve.tokens, curve.losses[metric], "o-", color="black", label=f"baseline curve ({curve.name}, {metric})")
    for label, loss, eff in placed:
        ax.axhline(loss, ls=":", lw=1, color="tab:blue")
        if eff is not None:
            ax.plot([eff * curve.budget], [loss], "s", color="tab:red")
            ax.annotate(f"{label}: {eff:.2f}x", (eff * curve.budget, loss), textcoords="offset points", xytext=(6, 4), fontsize=8)
        else:
            ax.annotate(f"{label} (off the curve)", (curve.tokens[0], loss), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.axvline(curve.budget, color="gray", lw=1, ls="--", label=f"budget {curve.budget:,} tokens")
    return _save_tokens_plot(fig, ax, metric, "runs placed on the baseline curve (data efficiency)", out, "efficiency.png")


def per_k_plot(ensembles: list[tuple[str, dict]], out: Path, metric: str, name: str = "ensemble_per_k.png") -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, res in ensembles:
        ks = [r["k"] for r in res["per_k"]]
        ax.plot(ks, [r[f"probs_{metric}_loss"] for r in res["per_k"]], "o-", label=f"{label} (prob avg)")
        if f"logits_{metric}_loss" in res["per_k"][0]:
            ax.plot(ks, [r[f"logits_{metric}_loss"] for r in res["per_k"]], "s--", label=f"{label} (logit avg)")
    ax.set_xticks(sorted({r["k"] for _, res in ensembles for r in res["per_k"]}))
    ax.set_xlabel("members k")
    ax.set_ylabel(f"{metric} loss of the first k members")
    ax.set_title("ensemble size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def _partial(ab: dict) -> bool:
    """An ablation written before all its runs finished (`slowrun ablate --no-train`)."""
    return ab.get("finished") is not None and ab.get("runs") is not None and ab["finished"] < ab["runs"]


def ablation_plot(ab: dict, out: Path) -> str:
    """Bars of each technique's delta (mean test loss without it - the full recipe's), with
    error bars of one standard error of that difference."""
    plt = _plt()
    full = ab["full"]
    rows = sorted((v for v in ab["variants"] if v.get("delta_test") is not None), key=lambda v: v["delta_test"])
    se = [math.sqrt((v["test_std"] or 0) ** 2 / max(v["seeds"], 1) + (full["test_std"] or 0) ** 2 / max(full["seeds"], 1))
          for v in rows]
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(rows) + 1.5))
    # green: the recipe gains from it (a technique whose removal raises the loss, a swap that lowers it)
    ax.barh([v["technique"] + (" (swap)" if v.get("swap") else "") for v in rows], [v["delta_test"] for v in rows],
            xerr=se, capsize=3, color=["tab:green" if (v["delta_test"] > 0) != bool(v.get("swap")) else "tab:red" for v in rows])
    ax.axvline(0, color="black", lw=1)
    ax.set_xlabel("test loss - the full recipe's (a technique removed: > 0, it helps; a swap: < 0, it helps)")
    swaps = [bool(v.get("swap")) for v in rows]
    what = "swaps against" if all(swaps) else "leave-one-out ablation and swaps of" if any(swaps) else "leave-one-out ablation of"
    partial = f", partial: {ab['finished']} of {ab['runs']} runs" if _partial(ab) else ""
    ax.set_title(f"{what} {ab['recipe']} ({ab['seeds']} seeds{partial}; bars: +- 1 standard error)")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(out / "ablation.png", dpi=110)
    plt.close(fig)
    return "ablation.png"


def ablation_section(path: str | Path, out: Path) -> str:
    path = Path(path)
    if path.is_dir():
        path = path / "ablation.json"
    try:
        ab = read_json(path, ReportError, what="--ablation")
    except OSError as e:
        raise ReportError(f"--ablation {path}: not readable ({e.strerror or e})") from None
    if not isinstance(ab, dict) or ab.get("format") != "slowrun-ablation/1":
        raise ReportError(f"--ablation {path}: not an ablation.json of `slowrun ablate`")
    def eff(v: dict) -> str:
        return describe_efficiency(v) if v.get("efficiency") is not None or "efficiency_error" in v else "-"

    full = ab["full"]
    rows = [["(full recipe)", full["test_mean"], full["test_std"], None, None, full["val_mean"], eff(full), full["seeds"]]]
    rows += [[v["technique"] + (" (swap)" if v.get("swap") else ""), v["test_mean"], v["test_std"], v.get("delta_test"),
              v.get("p_better" if v.get("swap") else "p_hurts"), v["val_mean"], eff(v), v["seeds"]] for v in ab["variants"]]
    partial = (f"<p><b>Partial</b>: {ab['finished']} of {ab['runs']} runs finished; each row's means are over the "
               "seeds that finished (its seeds column), and a row with none is empty.</p>") if _partial(ab) else ""
    return (f"<h2>Ablation: {html.escape(ab['recipe'])}</h2>" + partial + f'<img src="{ablation_plot(ab, out)}" alt="ablation">'
            + _table(["technique removed, or swap", "test loss mean", "std", "delta", "p (removing hurts; a swap helps)",
                      "val loss mean", "efficiency", "seeds"], rows)
            + f"<p>Source: <code>{html.escape(str(path))}</code></p>")


TRACK_ENTRIES = ("single", "ensemble", "distill")


def entry_label(kind: str, entry: dict) -> str:
    """A track entry in words; a distilled one says how its members learned."""
    if kind != "distill":
        return {"single": "single model", "ensemble": "ensemble"}[kind]
    return "ensemble, its last member distilled from the others" if entry.get("distill") == "ensemble" \
        else "chain-distilled ensemble"


def track_plot(res: dict, out: Path) -> str:
    """The track's baseline curve (test loss, seed spread as error bars), the second comparator
    curve beside it, and each entry at its efficiency on the first (hollow where extrapolated)."""
    plt = _plt()
    bc = res["baseline_curve"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    half = [c.get("test_spread", 0.0) / 2 for c in bc["chosen"]]
    ax.errorbar(bc["tokens"], bc["losses"]["test"], yerr=half, fmt="o-", color="black", capsize=3,
                label=f"{bc.get('recipe')} curve (mean of seeds; bars: seed range)")
    if "gpt2_curve" in res:
        g = res["gpt2_curve"]
        ax.plot(g["tokens"], g["losses"]["test"], "o--", color="gray", label=f"{g['name']} (second comparator)")
    budget = bc["tokens"][0] / bc["chosen"][0]["budget"]
    for kind in TRACK_ENTRIES:
        e = res.get(kind)
        if not e:
            continue
        label = entry_label(kind, e)
        ax.axhline(e["test_loss"], ls=":", lw=1, color="tab:blue")
        if e.get("efficiency") is not None:
            x, extra = e["efficiency"] * budget, e.get("efficiency_extrapolated")
            ax.plot([x], [e["test_loss"]], "s", color="tab:red", mfc="none" if extra else "tab:red")
            ax.annotate(f"{label}: {e['efficiency']:.2f}x" + (" (extrapolated)" if extra else ""), (x, e["test_loss"]),
                        textcoords="offset points", xytext=(6, 4), fontsize=8)
        else:  # beyond the curve with no usable fit: the table says why
            ax.annotate(f"{label}: no efficiency", (bc["tokens"][0], e["test_loss"]), textcoords="offset points",
                        xytext=(6, 4), fontsize=8)
    return _save_tokens_plot(fig, ax, "test", "CPU track: entries placed on the baseline curve", out, "track_curves.png")


def track_section(path: str | Path, out: Path) -> str:
    """The CPU track from its results file (`slowrun bench cpu-track`): the baseline curve, what
    is still pending of it, and every entry placed on it and on the second comparator. Needs
    no run directory: everything is read from the results file."""
    path = Path(path)
    try:
        res = read_json(path, ReportError, what="--track-results")
        bc = res["baseline_curve"]
        bc["tokens"], bc["losses"]["test"], bc["chosen"]
    except (OSError, KeyError, TypeError) as e:
        raise ReportError(f"--track-results {path}: not a results file of `slowrun bench cpu-track` ({e})") from None
    crows = [[f"{c['budget']:g}x", t, ", ".join(f"{k.rpartition('.')[2]} {v:g}" for k, v in c["point"].items())
              + (" (at the edge)" if "at_edge" in c else "") + (" (refined)" if "refined_from" in c else ""),
              c.get("params"), c.get("seeds", 1), c.get("val_loss"), c.get("test_loss"), c.get("test_spread")]
             for c, t in zip(bc["chosen"], bc["tokens"])]
    crows += [[b, None, f"pending: {why}", None, None, None, None, None] for b, why in bc.get("pending", {}).items()]
    erows, krows = [], []
    for kind in TRACK_ENTRIES:
        e = res.get(kind)
        if not e:
            continue
        label = entry_label(kind, e)
        erows.append([label, e.get("members", 1), e.get("variant"), e["test_loss"], e.get("test_bpb"), describe_efficiency(e),
                      describe_efficiency(e.get("efficiency_second", {})), fmt_time(e["wall_s"]) if "wall_s" in e else None])
        for row, pk in zip(e.get("per_k", []), e.get("efficiency_by_k", [])):
            krows.append([label, row["k"], row.get("probs_test_loss"), describe_efficiency(pk), row.get("logits_test_loss")])
    html_out = (f"<h2>CPU track: the {html.escape(str(bc.get('recipe')))} curve and the entries on it</h2>"
                + f'<img src="{track_plot(res, out)}" alt="track curves">'
                + _table(["entry", "members", "variant", "test loss", "test bpb", "efficiency",
                          f"on {res.get('gpt2_curve', {}).get('name', 'the second curve')}", "wall time"], erows)
                + "<h3>Baseline curve (the mean of each chosen point's seeds)</h3>"
                + _table(["budget", "train tokens", "chosen point", "params", "seeds", "val loss", "test loss",
                          "seed spread (test)"], crows))
    second = res.get("gpt2_curve", {})
    fits = [(f"the {bc.get('recipe')} curve", bc.get("fit")), (second.get("name"), second.get("fit"))]
    html_out += "".join(f"<p>Power-law fit of {html.escape(str(name))}: {html.escape(describe_fit(fit))}</p>"
                        for name, fit in fits if fit)
    if krows:
        ensembles = [(entry_label(kind, res[kind]), res[kind]) for kind in TRACK_ENTRIES if res.get(kind, {}).get("per_k")]
        html_out += ("<h3>Ensembles by size (first k members)</h3>"
                     + f'<img src="{per_k_plot(ensembles, out, "test", "track_per_k.png")}" alt="per-K">'
                     + _table(["entry", "k", "prob. average test loss", "efficiency", "logit average test loss"], krows))
    return html_out + f"<p>Source: <code>{html.escape(str(path))}</code></p>"


CSS = """body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}img{max-width:100%}code{background:#f4f4f4;padding:1px 4px}"""


def _open_run(p: Path) -> dict | None:
    """The run's result, or None for a run still in progress."""
    rd = RunDir(p)
    if rd.finished():
        result = read_result(p)
        chosen(result)  # a `best` that names no variant is refused before anything is written
        return result
    if rd.metrics.is_file() or rd.config.is_file():
        return None
    raise ReportError(f"{p}: not a run or ensemble (no {RESULT}, {METRICS} or {CONFIG})")


# every plot this module writes; a rebuilt report removes those it did not write again (stale)
PLOTS = ("loss_by_step.png", "val_by_epoch.png", "efficiency.png", "ensemble_per_k.png", "ablation.png",
         "track_curves.png", "track_per_k.png")


def build_report(runs: list[str], out: str | Path, curve: str | None = None, records_dir: str | Path | None = None,
                 track: str | None = None, title: str = "slowrun report", ablation: str | None = None,
                 track_results: str | None = None) -> Path:
    out = Path(out)
    paths = [Path(r) for r in runs]
    results = {p: _open_run(p) for p in paths}
    recs = track_records(records_dir, track) if records_dir and track else None  # read before anything is written
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    sections = [f"<h1>{html.escape(title)}</h1>"]
    if track_results:
        sections.append(track_section(track_results, out))
    if ablation:
        sections.append(ablation_section(ablation, out))

    finished = [p for p in paths if results[p] is not None]
    singles = [p for p in paths if not (results[p] and is_ensemble(results[p]))]
    ensembles = [p for p in finished if is_ensemble(results[p])]
    metric = "test"
    rows = []
    for p in paths:
        r = results[p]
        if r is None:
            train, _ = _metrics(p)
            rows.append([p.name, "in progress", None, None, train[-1].get("tokens") if train else None, "-"])
            continue
        name, losses = chosen(r)
        rows.append([p.name, name, losses.get("val_loss"), losses.get("test_loss"), r.get("tokens_seen"),
                     fmt_time(r["wall_s"]) if isinstance(r.get("wall_s"), (int, float)) else None])
    if paths:
        sections.append("<h2>Runs</h2>" + _table(["run", "variant", "val loss", "test loss", "tokens seen", "wall time"], rows)
                        + "<p>Sources: " + ", ".join(f"<code>{html.escape(str(RunDir(p).result))}</code>" for p in finished) + "</p>")

    if singles:
        for f in loss_curves(singles, results, out):
            sections.append(f'<img src="{f}" alt="{f}">')
        for p in singles:
            r = results[p]
            if r is None:
                sections.append(f"<h3>{html.escape(p.name)}</h3><p>in progress: no final evaluation yet</p>")
                continue
            vrows = [[name, v.get("val_loss"), v.get("val_bpb"), v.get("test_loss"), v.get("test_bpb")] for name, v in r["variants"].items()]
            sections.append(f"<h3>{html.escape(p.name)}</h3>" + _table(["variant", "val loss", "val bpb", "test loss", "test bpb"], vrows))

    if curve:
        cv = Curve.load(curve)
        metric = "test" if "test" in cv.losses else "val"
        placed, erows = [], []
        for p in finished:
            loss = _run_loss(results[p], metric)
            try:
                eff = place(cv, loss, metric).efficiency if loss is not None else None
            except EfficiencyError:
                eff = None
            placed.append((p.name, loss, eff))
            erows.append([p.name, loss, f"{eff:.2f}x" if eff is not None else "off the curve"])
        sections.append("<h2>Data efficiency</h2>" + f'<img src="{curve_plot(cv, placed, out, metric)}" alt="efficiency">'
                        + _table(["run", f"{metric} loss", "efficiency"], erows)
                        + _table(["budget tokens", f"baseline {metric} loss"], [[t, l] for t, l in zip(cv.tokens, cv.losses[metric])]))

    if ensembles:
        sections.append("<h2>Ensembles</h2>" + f'<img src="{per_k_plot([(p.name, results[p]) for p in ensembles], out, "test")}" alt="per-K">')
        for p in ensembles:
            r = results[p]
            krows = [[k["k"], k.get("probs_val_loss"), k.get("probs_test_loss"), k.get("logits_val_loss"), k.get("logits_test_loss")]
                     for k in r["per_k"]]
            sections.append(f"<h3>{html.escape(p.name)}</h3>" + _table(["k", "probs val", "probs test", "logits val", "logits test"], krows))

    if recs is not None:
        rrows = [[r["name"], r["date"], r["members"], len(r["seeds"]), r["test_loss"]["mean"], r["test_loss"]["std"],
                  (r.get("efficiency") or {}).get("value"), (r.get("vs_best") or {}).get("p_value")] for r in recs]
        sections.append(f"<h2>Records: {html.escape(track)} track</h2>"
                        + _table(["name", "date", "members", "seeds", "test loss mean", "std", "efficiency", "p vs previous"], rrows))

    page = f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{CSS}</style></head><body>" \
           + "\n".join(sections) + "</body></html>\n"
    atomic_write_text(out / "index.html", page)
    for name in PLOTS:  # a plot of an earlier build that this page no longer shows
        if f'src="{name}"' not in page:
            (out / name).unlink(missing_ok=True)
    return out / "index.html"
