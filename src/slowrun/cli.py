"""The `slowrun` command line: a table of subcommands, each a thin layer over an importable function.

This module holds the table, the commands on files (`prepare`, `data`, `ledger`) and the
one-line errors; the training-side commands are in `commands`. torch is imported only by the
commands that run it, so `slowrun --help` is fast; importing this module does nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from . import SlowrunError, __version__
from .commands import Command, count
from .commands import table as training_commands
from .config import parse_overrides
from .dataset import Dataset
from .ledger import Ledger, LedgerError, compare_rerun, rerun_line, rerun_recipe
from .prepare import PrepareConfig, prepare
from .rundir import RunDir
from .sources import require_source
from .storage import atomic_write_json
from .tokenizer import parse_tokenizer_spec


class _Parser(argparse.ArgumentParser):
    """Usage errors (a bad flag value, a missing argument) in one line, exit 2: the usage block
    is one `--help` away."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # "-5k" is a (negative) value, as "-5" is, so the count parser refuses it in one line rather
        # than argparse taking it for an unknown flag
        self._negative_number_matcher = re.compile(r"^-\d*\.?\d+[kMB]?$")

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------------------------------
# prepare / data


def _add_prepare(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", default="builtin", help="builtin (default; offline packaged prose), a .txt/.jsonl/.parquet file or directory, "
                   "hf:DATASET[:CONFIG] (streamed; needs the hf extra and a network), a .pt tokens file, or a directory with fineweb_val.pt + fineweb_train.pt")
    p.add_argument("--tokenizer", default="bpe:8192", help="bpe:N (byte-level BPE with N tokens trained on the training text; default bpe:8192), gpt2 (the exact GPT-2 BPE, offline), or a path to a tokenizer.json (to share one tokenizer between datasets)")
    p.add_argument("--train-tokens", type=count, default=262_144, help="training budget in tokens, exact (default 262144; suffixes k, M, B)")
    p.add_argument("--val-tokens", type=count, default=131_072, help="validation split in tokens (default 131072)")
    p.add_argument("--test-tokens", type=count, default=131_072, help="test split in tokens (default 131072; 0: none, e.g. for the reference's train + val files)")
    p.add_argument("--out", default="data/builtin", help="output directory (default data/builtin)")
    p.add_argument("--seed", type=int, default=0, help="seed of the document shuffle (default 0)")
    p.add_argument("--separator", default=None, help="split .txt files into documents at this string (default: one document per file); \\n escapes allowed")
    p.add_argument("--text-field", default="text", help="text field/column of .jsonl, .parquet and hf sources (default text)")
    p.add_argument("--data-files", nargs="+", default=None, help="hf: local data files (e.g. --source hf:parquet --data-files a.parquet)")
    p.add_argument("--encoding", default="utf-8", help="text encoding of .txt and .jsonl files (default utf-8); decoded strictly: "
                   "a byte that is not valid in it stops prepare with the file and byte offset")
    p.add_argument("--force", action="store_true", help="replace an output directory that holds a different dataset")
    p.add_argument("--threads", type=int, default=0, help="tokenizer threads (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_prepare(a: argparse.Namespace) -> int:
    if a.test_tokens == 0:  # the reference's own data (train + val) has none; runs then report val only
        print("note: --test-tokens 0: no test split; runs on this dataset report val losses only, and records "
              "(scored on test) cannot be made from them", file=sys.stderr)
    require_source(a.source)  # before --out is looked at: a missing source is the error to report
    sep = a.separator.encode().decode("unicode_escape") if a.separator else None
    cfg = PrepareConfig(source=a.source, tokenizer=a.tokenizer, train_tokens=a.train_tokens, val_tokens=a.val_tokens,
                        test_tokens=a.test_tokens, out=a.out, seed=a.seed, separator=sep, text_field=a.text_field,
                        data_files=a.data_files, encoding=a.encoding, force=a.force, progress=not a.no_progress,
                        threads=a.threads)
    t0 = time.time()
    out = prepare(cfg)
    ds = Dataset.open(out, verify=False)
    sp = ds.manifest["splits"]
    print(f"prepared {out} in {time.time() - t0:.1f}s: tokenizer {ds.manifest['tokenizer']['id']}, "
          + ", ".join(f"{s} {sp[s]['tokens']:,} tokens / {sp[s]['documents']:,} docs" for s in ("train", "val", "test")))
    kind, asked = parse_tokenizer_spec(a.tokenizer)
    if kind == "bpe" and ds.vocab_size < asked:
        print(f"note: --tokenizer {a.tokenizer} asked for {asked:,} tokens; the training text gave only {ds.vocab_size:,} "
              f"(the tokenizer is recorded as {ds.manifest['tokenizer']['id']})")
    return 0


def _add_data(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_cmd", required=True, metavar="{info}")
    info = sub.add_parser("info", help="print a dataset's manifest and verify every file's sha256")
    info.add_argument("dir", help="prepared dataset directory")


def _run_data(a: argparse.Namespace) -> int:
    ds = Dataset.open(a.dir, verify=True)
    print(ds.describe())
    print(f"verified  all {len(ds.manifest['files'])} files match their sha256")
    return 0


# ---------------------------------------------------------------------------------------
# ledger


def _add_ledger(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="ledger_cmd", required=True, metavar="{merge,rerun}")
    m = sub.add_parser("merge", help="append a ledger brought back from another machine (only the lines DST lacks)",
                       description="append a ledger brought back from another machine (only the lines DST lacks)")
    m.add_argument("src", metavar="SRC", help="the ledger to read (JSON Lines)")
    m.add_argument("dst", metavar="DST", help="the ledger to append to (created if absent)")
    r = sub.add_parser("rerun", help="train one line's config again here and compare its losses with the line's",
                       description="train one line's config again here and compare its losses with the line's; "
                                   "--train.KEY=VALUE overrides may set only what cannot change the losses "
                                   "(device, threads, logging)")
    r.add_argument("ledger", metavar="LEDGER", help="the ledger (JSON Lines)")
    r.add_argument("key", metavar="KEY", help="the line's config key, a unique prefix of it, or @N for line N")
    r.add_argument("--data", required=True, help="the line's dataset, prepared here")
    r.add_argument("--run-dir", required=True, help="where the rerun trains")
    r.add_argument("--out", default=None, help="write the comparison as JSON here too")


def _run_ledger(a: argparse.Namespace) -> int:
    overrides = getattr(a, "overrides", []) or []
    bad = [o for o in overrides if a.ledger_cmd == "merge" or not o.startswith("--") or "=" not in o]
    if bad:
        raise SlowrunError(f"unrecognized arguments: {' '.join(bad)}")
    read = a.src if a.ledger_cmd == "merge" else a.ledger
    if not Path(read).is_file():  # Ledger.open reads a missing file as empty: right for a destination only
        raise LedgerError(f"{read}: no such ledger file")
    if a.ledger_cmd == "merge":
        src, dst = Ledger.open(a.src), Ledger.open(a.dst)
        n = dst.merge(src)
        print(f"merged {n} of {len(src.entries)} entries of {src.path} into {dst.path} ({len(dst.entries)} now)")
        return 0
    entry = rerun_line(Ledger.open(a.ledger), a.key, a.data, overrides)
    # through the job runner: a signal to this command reaches the run (which checkpoints) and
    # the same command resumes it; the recipe file is needed only until the run has its config.toml
    from .jobs import JobsFailed, TrainJob, run_jobs  # imports torch

    with tempfile.TemporaryDirectory(prefix="slowrun-rerun-") as tmp:
        job = TrainJob(Path(a.run_dir), str(rerun_recipe(entry, Path(tmp) / "recipe.toml")), a.data,
                       parse_overrides(overrides))
        failures = run_jobs([job], desc="rerun")
    if failures:
        raise JobsFailed(failures, f"the rerun of {entry['key']} (its log: {RunDir(a.run_dir).log})")
    cmp = compare_rerun(entry, a.run_dir)
    print(f"{cmp['key']} ({a.ledger}:{cmp['line']}): {cmp['ledger_device']} -> {cmp['device']}")
    for v, splits in cmp["variants"].items():
        print(f"  {v:<12}" + "  ".join(f"{k} {d['ledger']:.4f} -> {d['here']:.4f} ({d['diff']:+.4f})"
                                       for k, d in splits.items()))
    if a.out:
        atomic_write_json(a.out, cmp)
    return 0


# ---------------------------------------------------------------------------------------
# the table


def _commands() -> list[Command]:
    return [
        Command("prepare", "tokenize a source into a fixed, hashed dataset (the token budget)", _add_prepare, _run_prepare),
        Command("data", "inspect prepared datasets (data info DIR)", _add_data, _run_data),
        *training_commands(),
        Command("ledger", "the results ledger: merge one brought back from another machine, or rerun one of its lines here",
                _add_ledger, _run_ledger, passthrough=True),
    ]


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Command]]:
    parser = _Parser(
        prog="slowrun",
        description="Data-efficient language-model pretraining: a fixed token budget, unlimited compute, lowest held-out loss wins.",
        epilog="Run `slowrun COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"slowrun {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    table = {}
    for cmd in _commands():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_args(p)
        table[cmd.name] = cmd
    return parser, table


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, table = build_parser()
    if not argv:
        parser.print_help()
        return 0
    # config overrides (--section.key=value) are collected apart from the command's own flags
    try:
        cmd = table.get(argv[0])
        if cmd is not None and cmd.passthrough:
            args, rest = parser.parse_known_args(argv)
            args.overrides = rest
        else:
            args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        return table[args.command].run(args)
    except SlowrunError as e:
        print(f"slowrun {argv[0]}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a missing file, a path through a file, a full disk, no permission: one line
        print(f"slowrun {argv[0]}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # train's Interrupted carries the resume command and 128 + the signal number
        print(f"slowrun {argv[0]}: {e.args[0] if e.args else 'interrupted'}", file=sys.stderr)
        return getattr(e, "exit_code", 130)


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
