"""The final evaluation: a finished run's weights variants scored on val and test (the final
weights, the EMA, the SWA (or snapshot) parameter and probability averages, and the probability
and parameter averages of the last epoch ends). `best` is the variant with the lowest val loss;
`result_table` is the table `slowrun train` prints at the end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import distributed
from .averaging import EMA, average_weights
from .checkpoint import read_weights, save_weights
from .config import RunConfig
from .dataset import Dataset
from .evaluate import EvalResult, prob_average, split_tokens, summarize, target_byte_counts, target_logprobs
from .gpt import GPT
from .results import member_weights
from .rundir import RunDir
from .runlog import RunLogger, fmt_time


def final_evaluation(model: GPT, cfg: RunConfig, ds: Dataset, run_dir: Path, ema: EMA | None, log: RunLogger,
                     env: distributed.DistEnv) -> dict:
    """Val and test loss/bpb of: the final weights, the EMA, the SWA (or snapshot) parameter
    average and probability average, and the probability averages (equal and recency-weighted)
    of the last epoch ends. `best` is the variant with the lowest val loss. Every rank calls it
    and scores its share of each split's chunks; rank 0 writes."""
    device = env.device
    T, bs, dt = cfg.model.seq_len, cfg.eval.batch_seqs, cfg.train.dtype
    splits = ["val"] + (["test"] if cfg.eval.test and ds.num_tokens("test") > T + 1 else [])
    if cfg.eval.test and "test" not in splits:
        log.line(f"note: no test losses: {ds.path} has {ds.num_tokens('test'):,} test tokens, fewer than one "
                 f"sequence of {T + 1}")
    tokens = {s: split_tokens(ds, s, T, cfg.eval.reference_batch) for s in splits}  # built once, scored by every pass
    tb = {s: target_byte_counts(tokens[s], T, ds.token_bytes) for s in splits}
    variants: dict[str, dict] = {}
    rd = RunDir(run_dir)
    snaps = rd.snapshots("swa_probs")
    epochs = rd.snapshots("epochs_probs") if cfg.train.epoch_snapshots else []
    epochs = epochs if len(epochs) > 1 else []
    # one line as each pass starts: after the loop's ETA reaches 0 this can take minutes
    members_needed = len(snaps) > 1  # for the probability average; one snapshot is its own parameter average
    passes = 1 + (ema is not None) + (len(snaps) if members_needed else 0) + bool(snaps) + len(epochs) + bool(epochs)
    done = 0

    def record(name: str, lps: dict[str, np.ndarray]) -> None:
        res = {}
        for s in splits:
            r: EvalResult = summarize(lps[s], tb[s])
            res.update({f"{s}_loss": r.loss, f"{s}_bpb": r.bpb})
        variants[name] = res
        log.line(f"final {name:<11} " + " | ".join(f"{k} {v:.4f}" for k, v in res.items()))

    def logprobs_of(m: torch.nn.Module, what: str) -> dict[str, np.ndarray]:
        nonlocal done
        done += 1
        log.line(f"final evaluation {done}/{passes}: {what} on {' and '.join(splits)}")
        return {s: target_logprobs(m, tokens[s], T, bs, device, dt, env=env) for s in splits}

    record("final", logprobs_of(model, "final weights"))
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    if ema is not None:
        model.load_state_dict(ema.state_dict())
        record("ema", logprobs_of(model, "EMA weights"))
    def members_of(paths: list[Path]) -> list[dict[str, np.ndarray]]:
        members = []
        for p in paths:
            state, _, _ = read_weights(p)
            model.load_state_dict(state)
            members.append(logprobs_of(model, f"snapshot {p.parent.name}/{p.name}"))
        return members

    def record_average(name: str, members: list[dict[str, np.ndarray]]) -> None:
        w = member_weights(name, len(members))
        record(name, {s: prob_average([m[s] for m in members], w) for s in splits})

    if epochs:
        members = members_of(epochs)
        for name in ("epochs_probs", "epochs_probs_recency"):
            record_average(name, members)
        avg = average_weights(epochs, lambda p: read_weights(p)[0], member_weights("_recency", len(epochs)))
        model.load_state_dict(avg)
        record("epochs_params_recency", logprobs_of(model, "the epoch ends' recency-weighted parameter average"))
        if cfg.train.save_final and env.is_main:
            save_weights(rd.weights("epochs_params_recency"), avg, cfg, {"dataset": ds.fingerprint})
    if snaps:
        label = "snapshot" if cfg.train.snapshot_cycles else "swa"
        if members_needed:
            record_average(f"{label}_probs", members_of(snaps))
        avg = average_weights(snaps, lambda p: read_weights(p)[0])
        model.load_state_dict(avg)
        record(f"{label}_params", logprobs_of(model, "the snapshots' parameter average"))
        if cfg.train.save_final and env.is_main:
            save_weights(rd.weights(f"{label}_params"), avg, cfg, {"dataset": ds.fingerprint})
    model.load_state_dict(saved)
    best = min(variants, key=lambda k: variants[k]["val_loss"])
    return {"variants": variants, "best": best, **{k: v for k, v in variants[best].items()}}


def result_table(result: dict) -> str:
    """The final evaluation as a table; a test column of '-' says why it is empty."""
    width = max([16] + [len(name) + 3 for name in result["variants"]])

    def cell(v: dict, key: str, w: int) -> str:
        return f"{v[key]:>{w}.4f}" if key in v else f"{'-':>{w}}"

    rows = [f"{'variant':<{width}}{'val loss':>10}{'val bpb':>10}{'test loss':>11}{'test bpb':>10}"]
    for name, v in result["variants"].items():
        rows.append(f"{name + (' *' if name == result['best'] else ''):<{width}}{cell(v, 'val_loss', 10)}{cell(v, 'val_bpb', 10)}"
                    f"{cell(v, 'test_loss', 11)}{cell(v, 'test_bpb', 10)}")
    if not any("test_loss" in v for v in result["variants"].values()):
        why = "eval.test is off" if not result["config"]["eval"]["test"] else "the dataset has no test split (or one too short)"
        rows.append(f"(no test losses: {why})")
    rows.append(f"(* = best on val) {result['steps']} steps, {result['tokens_seen']:,} tokens seen "
                f"({result['epochs']:.1f} epochs of {result['unique_tokens']:,}), {fmt_time(result['wall_s'])}, "
                f"{result['tokens_per_s']:,.0f} tok/s")
    return "\n".join(rows)
