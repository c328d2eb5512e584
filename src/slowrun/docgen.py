"""The generated parts of the docs: tables made from the config's own help and the committed results.

    python -m slowrun.docgen            rewrite every generated region of README.md and docs/*.md in place
    python -m slowrun.docgen --check    exit 1, naming each doc and region that differs from what is generated

Run both in the repository root. A region is delimited in the markdown by

    <!-- generated: KIND [ARG] (python -m slowrun.docgen) -->
    ...
    <!-- end generated -->

and the text around it is hand-written. The kinds:

    config               every config key, one table per section (key, default, help), from the dataclasses
    techniques           every technique of slowrun.techniques: in words, its config keys, its ablation switches
    ledger-runs RECIPE   every run of a curve recipe in benchmarks/results/ledger.jsonl
    ledger-curve RECIPE  per budget: the sizes tried, the best on val, the mean and spread of its seeds
    ablation FILE        an ablation.json of `slowrun ablate` (FILE relative to the repository root)

A region depends only on the code and the results files (rows sorted or in the file's order, no dates,
no paths but the results' own). `benchmarks/summary.py --ledger` and `--ablation` print the same tables.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterator

import tomli_w

from . import SlowrunError
from .storage import read_json

LEDGER = "benchmarks/results/ledger.jsonl"
DOCS = ("README.md", "docs/*.md")
COMMAND = "python -m slowrun.docgen"
START = re.compile(r"^<!-- generated: (?P<name>.+?) \(python -m slowrun\.docgen\) -->$", re.M)
END = "<!-- end generated -->"


class DocgenError(SlowrunError, ValueError):
    """A generated region that cannot be made: an unknown kind, a missing end marker, a missing or
    malformed results file (a ValueError too, which benchmarks/summary.py prints in one line)."""


# ---------------------------------------------------------------------------------------
# the tables


def _cell(text: str) -> str:
    """Text for a table cell: a pipe would end the cell, and a pair of * (2*x + 3*y) would turn italic."""
    return text.replace("|", "\\|").replace("*", "\\*")


def _literal(value: Any) -> str:
    """A default as a recipe or an override writes it (TOML), as code in a table cell (where only a pipe
    needs its backslash)."""
    text = tomli_w.dumps({"v": value})[4:].strip()
    return "`" + (text if "\n" not in text else repr(value)).replace("|", "\\|") + "`"


def config_tables() -> str:
    """Every key of every config section: a heading with the section's docstring, then key, default, help."""
    from .config import SECTIONS, section_defaults

    out = []
    for section, cls in SECTIONS.items():
        defaults = section_defaults(section)
        out += [f"### `{section}`", "", (cls.__doc__ or "").strip().splitlines()[0], "",
                "| key | default | help |", "|---|---|---|"]
        out += [f"| `{section}.{f.name}` | {_literal(defaults[f.name])} | {_cell(f.metadata['help'])} |"
                for f in fields(cls)]
        out.append("")
    return "\n".join(out[:-1])


def technique_table() -> str:
    """The techniques as `slowrun.techniques` declares them: each in words, its config keys and the names
    `slowrun ablate` leaves it out by."""
    from .techniques import technique_rows

    out = ["| technique | config | ablation (`slowrun ablate --only`) |", "|---|---|---|"]
    for doc, keys, switches in technique_rows():
        out.append(f"| {_cell(doc)} | {', '.join(f'`{k}`' for k in keys)} | {', '.join(f'`{a}`' for a in switches) or '-'} |")
    return "\n".join(out)


def ledger_rows(path: str | Path = LEDGER) -> list[tuple]:
    """One tuple a finished run: (train tokens, depth, lr_scale, batch, seed, recipe, params, val loss,
    test loss, device, wall s), losses of the run's best variant on val."""
    from .ledger import Ledger

    if not Path(path).is_file():  # a ledger opens empty when missing: here that is a wrong path
        raise FileNotFoundError(path)
    rows = []
    for e in Ledger.open(path).entries:
        tag, cfg, best = e.get("tag", {}), e["config"], e["variants"][e["best"]]
        rows.append((e["dataset"]["train_tokens"], cfg["model"]["depth"], cfg["optim"]["lr_scale"],
                     cfg["train"]["batch_tokens"], cfg["train"]["seed"], tag.get("recipe", "?"), e["params"],
                     best["val_loss"], best["test_loss"], e.get("device") or "-", e["wall_s"]))
    return rows


def runs_table(rows: list[tuple]) -> str:
    """Every run, by budget and size: the curve while it is being measured."""
    out = ["| train tokens | recipe | depth | lr_scale | batch | seed | params | val loss | test loss | device | wall (min) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for t, d, lr, b, seed, recipe, n, v, te, dev, w in sorted(rows):
        out.append(f"| {t:,} | {recipe} | {d} | {lr:g} | {b} | {seed} | {n:,} | {v:.4f} | {te:.4f} | {dev} | {w / 60:.1f} |")
    return "\n".join(out)


def curve_table(rows: list[tuple]) -> str:
    """Per curve recipe and budget, at the recipe's tuned lr and batch (CURVE_TUNED; a recipe not
    tuned yet: its best 1x lr and batch on val so far): the sizes tried, the best on val (seed
    0), whether it sits at an edge of the sizes tried, and the mean and spread of its seeds."""
    from .track import CURVE_TUNED, TRACK

    base = TRACK.budget
    out = ["| recipe | budget | train tokens | sizes tried | chosen (best val, seed 0) | seeds | val | test | seed spread (test) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for recipe in sorted({r[5] for r in rows}):
        mine = [r for r in rows if r[5] == recipe]
        tuned = CURVE_TUNED.get(recipe)
        if tuned is None:  # still tuning at 1x: the lr and batch of its best seed-0 point so far
            ones = [r for r in mine if r[0] == base and r[4] == 0]
            tuned = min(ones, key=lambda r: r[7])[2:4] if ones else (None, None)
        out += _chosen_rows(recipe, mine, tuned, base)
    return "\n".join(out)


def _chosen_rows(recipe: str, rows: list[tuple], tuned: tuple, base: int) -> list[str]:
    out = []
    for t in sorted({r[0] for r in rows}):
        grid = [r for r in rows if r[0] == t and (r[2], r[3]) == tuple(tuned)]
        first = {r[1]: r for r in grid if r[4] == 0}
        if not first:
            continue
        best = min(first.values(), key=lambda r: r[7])[1]
        depths = sorted(first)
        seeds = [r for r in grid if r[1] == best]
        tests = [r[8] for r in seeds]
        where = f"depth {best}" + (" (one size so far)" if len(depths) == 1 else
                                   ", at the edge" if best in (depths[0], depths[-1]) else " (inside)")
        spread = f"{max(tests) - min(tests):.4f}" if len(tests) > 1 else "-"
        tried = f"depth {depths[0]}-{depths[-1]}" if len(depths) > 1 else f"depth {depths[0]}"
        out.append(f"| {recipe} | {t / base:g}x | {t:,} | {tried} | {where} | {len(seeds)} | "
                   f"{sum(r[7] for r in seeds) / len(seeds):.4f} | {sum(tests) / len(tests):.4f} | {spread} |")
    return out


def ablation_table(path: str | Path) -> str:
    """An ablation.json of `slowrun ablate`: what it ran, then the full recipe and each technique left out or swap."""
    from .ablate import FORMAT, pm
    from .efficiency import describe_efficiency as eff

    ab = read_json(path, DocgenError)
    if not isinstance(ab, dict) or ab.get("format") != FORMAT:
        raise DocgenError(f"{path}: not an ablation.json of `slowrun ablate`")

    out = []
    if "recipe" in ab:
        fixed = ", ".join(f"{k}={v}" for k, v in ab.get("fixed", {}).items())
        seeds = ab.get("seeds", ab["full"]["seeds"])
        out += [f"The `{ab['recipe']}` recipe" + (f" with {fixed}" if fixed else "")
                + f"; {seeds} seed{'s' if seeds != 1 else ''} each"
                + ("; swaps at the recipe's wall time" if ab.get("equal_time") else "")
                + (f"; efficiency on the curve `{ab['curve']}`" if ab.get("curve") else "") + ".", ""]
    out += ["| technique left out, or swap | overrides | seeds | test loss by seed | test loss | delta | p | val loss | "
            "p (val) | efficiency | wall (min) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for rec in [ab["full"]] + ab["variants"]:
        name = ("the recipe" if rec is ab["full"] else f"{rec['technique']} (swap)" if rec.get("swap")
                else rec["technique"] + (f": {rec['what']}" if rec.get("what") else ""))
        over = ", ".join(f"{k}={v}" for k, v in rec["off"].items()) or "-"
        delta = rec.get("delta_test")
        p, p_val = (rec.get(("p_better" if rec.get("swap") else "p_hurts") + split) for split in ("", "_val"))
        e = eff(rec) if rec.get("efficiency") is not None else "-"
        wall = f"{rec['wall_s'] / 60:.1f}" if rec.get("wall_s") is not None else "-"
        by_seed = ", ".join(f"{x:.4f}" for x in rec.get("test_losses", [])) or "-"
        out.append(f"| {name} | {over} | {rec['seeds']} | {by_seed} | {pm(rec['test_mean'], rec['test_std'])} | "
                   f"{'-' if delta is None else f'{delta:+.4f}'} | {'-' if p is None else f'{p:.3f}'} | "
                   f"{pm(rec['val_mean'], rec['val_std'])} | {'-' if p_val is None else f'{p_val:.3f}'} | {e} | {wall} |")
    if ab.get("finished") != ab.get("runs"):
        out += ["", f"partial: {ab['finished']} of {ab['runs']} runs finished; means over the seeds that finished"]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------
# the regions


def generate(name: str, root: Path, ledger: Path | None = None) -> str:
    """The text of one region, from its name (`KIND [ARG]`); files are read relative to root."""
    kind, _, arg = name.partition(" ")
    if kind == "config" and not arg:
        return config_tables()
    if kind == "techniques" and not arg:
        return technique_table()
    if kind in ("ledger-runs", "ledger-curve") and arg:
        rows = [r for r in ledger_rows(ledger or root / LEDGER) if r[5] == arg]
        if not rows:
            raise DocgenError(f"region '{name}': no run of recipe {arg} in {ledger or LEDGER}")
        return runs_table(rows) if kind == "ledger-runs" else curve_table(rows)
    if kind == "ablation" and arg:
        if not (root / arg).is_file():
            raise DocgenError(f"region '{name}': no such file {arg}")
        return ablation_table(root / arg)
    raise DocgenError(f"region '{name}': unknown; the kinds are config, techniques, ledger-runs RECIPE, "
                      f"ledger-curve RECIPE, ablation FILE")


def regions(text: str, doc: str = "the doc") -> Iterator[tuple[str, int, int]]:
    """(name, start, end) of each region's body: text[start:end] lies between its two marker lines."""
    for m in START.finditer(text):
        end = text.find(END, m.end())
        after = START.search(text, m.end())
        line = text.count("\n", 0, m.start()) + 1
        if end == -1 or (after is not None and after.start() < end):
            raise DocgenError(f"{doc}:{line}: region '{m['name']}' has no `{END}` before the next region or the end")
        yield m["name"], m.end() + 1, end


def render(text: str, root: Path, doc: str = "the doc", ledger: Path | None = None) -> tuple[str, list[str]]:
    """The doc with every region regenerated, and the names of the regions that changed."""
    out, changed, pos = [], [], 0
    for name, start, end in regions(text, doc):
        try:
            body = "\n" + generate(name, root, ledger) + "\n\n"
        except (OSError, ValueError) as e:  # DocgenError, a missing or malformed results file
            line = text.count("\n", 0, start)  # the marker's
            raise DocgenError(f"{doc}:{line}: {e}") from None
        out += [text[pos:start], body]
        if text[start:end] != body:
            changed.append(name)
        pos = end
    return "".join(out + [text[pos:]]), changed


def doc_paths(root: Path) -> list[Path]:
    return sorted(p for pattern in DOCS for p in root.glob(pattern))


def check(root: Path, docs: list[Path] | None = None, ledger: Path | None = None) -> list[str]:
    """One line per region that differs from what is generated; [] when every doc is current."""
    problems = []
    for path in docs if docs is not None else doc_paths(root):
        doc = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
        _, changed = render(path.read_text(), root, doc, ledger)
        problems += [f"{doc}: region '{name}' differs from what `{COMMAND}` generates" for name in changed]
    return problems


def write(root: Path, docs: list[Path] | None = None, ledger: Path | None = None) -> list[str]:
    """Rewrite each doc whose regions are stale; the lines saying which regions of which doc changed."""
    said = []
    for path in docs if docs is not None else doc_paths(root):
        doc = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
        new, changed = render(path.read_text(), root, doc, ledger)
        if changed:
            path.write_text(new)
            said.append(f"{doc}: regenerated {', '.join(repr(n) for n in changed)}")
    return said


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=COMMAND, description="Rewrite the generated tables of README.md and docs/*.md "
                                 "(the config reference, the techniques, the ledger's and the ablations' tables) from their sources.")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 naming each stale doc and region")
    ap.add_argument("--root", default=".", help="the repository root (default: the current directory)")
    args = ap.parse_args(argv)
    root = Path(args.root).resolve()
    if not (root / "docs").is_dir():
        print(f"{COMMAND}: {root} has no docs/ (run it in the repository root, or give --root)", file=sys.stderr)
        return 2
    try:
        lines = check(root) if args.check else write(root)
    except (DocgenError, FileNotFoundError, ValueError) as e:
        print(f"{COMMAND}: {e}", file=sys.stderr)
        return 2
    for line in lines:
        print(line, file=sys.stderr if args.check else sys.stdout)
    return 1 if args.check and lines else 0


if __name__ == "__main__":
    sys.exit(main())
