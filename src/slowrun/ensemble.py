"""Ensembles: K members of a recipe, chain distillation, and ensemble evaluation.

Training: member k is a normal run directory (seed = train.seed + k). With `distill`
"chain", member k >= 1 is trained on (1-a)*CE + a*T^2*KL with member k-1 as its teacher (one
teacher in memory at a time, whatever K is); with "ensemble", members 0..K-2 train as a plain
ensemble (side by side) and the last, the student, learns from all of them (their probabilities
at T averaged: Kim et al.'s distillation of an ensemble into one model). An interrupted
ensemble continues with the member it was on.

Evaluation (of any runs, checkpoints or weight files sharing tokenizer and val/test):
probability averaging, logit averaging and parameter averaging (when shapes match), a
per-member table and a per-K table (the first k members, k = 1..K). Probability
averaging needs only each member's log-probability of every target, so members are
evaluated one at a time; logit averaging accumulates the members' logits block by
block. Gradient-based member selection fits softmax mixture weights on a fitness slice
carved from the end of the *training* split (never val/test), which the members must
not have trained on (`data.fitness_tokens`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import SlowrunError
from .averaging import average_weights
from .checkpoint import load_model, read_weights, weights_path
from .config import build_config
from .dataset import COMPARABLE, Dataset, DatasetError, read_manifest, require_comparable, training_fingerprint
from .distributed import resolve_device
from .evaluate import autocast, chunk_batches, prob_average, split_tokens, summarize, target_byte_counts, target_logprobs
from .gpt import GPT
from .jobs import JobsFailed, TrainJob, run_jobs
from .loader import fitness_slice
from .results import is_ensemble, read_result
from .rundir import VARIANT_FILES, RunDir
from .storage import atomic_write_json


class EnsembleError(SlowrunError):
    pass


def best_weights(run_dir: str | Path) -> Path:
    """The weights file of a run's best single-model variant (by val loss)."""
    rd = RunDir(run_dir)
    if not rd.finished():
        return weights_path(run_dir)
    variants = read_result(run_dir)["variants"]
    for name in sorted(variants, key=lambda k: variants[k]["val_loss"]):
        if name in VARIANT_FILES and rd.weights(name).is_file():
            return rd.weights(name)
    return weights_path(run_dir)


def _training_split_hash(weights: Path, data_path: str) -> str | None:
    """sha256 of the training split a weights file was trained on: from its run's result.json
    (run/model.safetensors, run/swa/*, run/checkpoints/step_N/*), else from the manifest of
    the dataset its config names; None when neither is there."""
    for run in weights.parents[:3]:
        if RunDir(run).finished():
            result = read_result(run)
            if not is_ensemble(result):
                return result.get("dataset", {}).get("train")
    try:
        return read_manifest(data_path)["files"].get("train.bin")
    except DatasetError:
        return None


@dataclass
class Member:
    label: str
    path: Path  # a weights file
    seq_len: int
    dataset: dict  # tokenizer / val / test fingerprint recorded in the weights
    train: str | None  # sha256 of the training split it was trained on (None: unknown)
    fitness_tokens: int  # training tokens it held out at the end of its training split
    nbytes: int
    reference_batch: int  # eval.reference_batch of its run: which val chunks are scored

def open_members(refs: list[str]) -> list[Member]:
    members = []
    for ref in refs:
        p = Path(ref)
        path = best_weights(p) if p.is_dir() and RunDir(p).finished() else weights_path(p)
        for m in members:  # one model twice would count as two members
            if m.path.resolve() == path.resolve():
                raise EnsembleError(f"{ref} and {m.label} are the same weights ({path}): an ensemble counts each model once")
        state, cfg, extra = read_weights(path)
        members.append(Member(str(ref), path, cfg.model.seq_len, extra.get("dataset", {}),
                              _training_split_hash(path, cfg.data.path), cfg.data.fitness_tokens,
                              sum(v.numel() * v.element_size() for v in state.values()), cfg.eval.reference_batch))
    if not members:
        raise EnsembleError("an ensemble needs at least one member")
    first = members[0]
    for m in members[1:]:
        require_comparable({**m.dataset, "seq_len": m.seq_len}, {**first.dataset, "seq_len": first.seq_len},
                           f"members {first.label} and {m.label} (cannot be ensembled)", COMPARABLE + ("seq_len",))
    return members


class _ModelCache:
    """Members' models, kept loaded while they fit in `budget_bytes`, else reloaded on use."""

    def __init__(self, members: list[Member], device: torch.device, budget_bytes: int) -> None:
        self.members, self.device = members, device
        self.keep = sum(m.nbytes for m in members) <= budget_bytes
        self.cache: dict[int, GPT] = {}

    def get(self, i: int) -> GPT:
        if i in self.cache:
            return self.cache[i]
        model, _, _ = load_model(self.members[i].path, self.device)
        if self.keep:
            self.cache[i] = model
        return model


def _split_result(lp: np.ndarray, tb: np.ndarray) -> dict:
    r = summarize(lp, tb)
    return {"loss": r.loss, "bpb": r.bpb}


def evaluate_ensemble(refs: list[str], data: str | Path | None = None, splits: tuple[str, ...] = ("val", "test"),
                      device: str = "auto", dtype: str = "fp32", batch_seqs: int = 8, logits: bool = True,
                      params: bool = True, fitness_tokens: int = 0, select: int = 0,
                      memory_budget_gb: float = 4.0, log=print) -> dict:
    members = open_members(refs)
    dev = resolve_device(device)
    if data is None:
        _, cfg, _ = read_weights(members[0].path)
        data = cfg.data.path
    ds = Dataset.open(data)
    fp = ds.fingerprint
    if members[0].dataset:
        require_comparable(members[0].dataset, fp, f"the members and the dataset {ds.path}")
    T = members[0].seq_len
    splits = tuple(s for s in splits if ds.num_tokens(s) > T + 1)
    K = len(members)
    rb = members[0].reference_batch
    tokens = {s: split_tokens(ds, s, T, rb) for s in splits}
    tb = {s: target_byte_counts(tokens[s], T, ds.token_bytes) for s in splits}

    # per-member log-probabilities, one member in memory at a time
    lps: dict[str, list[np.ndarray]] = {s: [] for s in splits}
    per_member = []
    for i, m in enumerate(members):
        model, _, _ = load_model(m.path, dev)
        row = {"member": i, "label": m.label, "weights": str(m.path)}
        for s in splits:
            lp = target_logprobs(model, tokens[s], T, batch_seqs, dev, dtype)
            lps[s].append(lp)
            r = _split_result(lp, tb[s])
            row.update({f"{s}_loss": r["loss"], f"{s}_bpb": r["bpb"]})
        per_member.append(row)
        log(f"member {i}: " + " | ".join(f"{s} loss {row[f'{s}_loss']:.4f}" for s in splits) + f"  ({m.label})")
        del model

    per_k = [{"k": k} for k in range(1, K + 1)]
    for s in splits:
        for k in range(1, K + 1):
            r = _split_result(prob_average(lps[s][:k]), tb[s])
            per_k[k - 1].update({f"probs_{s}_loss": r["loss"], f"probs_{s}_bpb": r["bpb"]})
    methods: dict[str, dict] = {"probs": {f"{s}_{q}": per_k[-1][f"probs_{s}_{q}"] for s in splits for q in ("loss", "bpb")}}

    if logits and K > 1:
        cache = _ModelCache(members, dev, int(memory_budget_gb * 2**30))
        for s in splits:
            nats = np.zeros(K)
            for chunk in chunk_batches(tokens[s], T, batch_seqs):
                x = torch.from_numpy(chunk[:, :-1]).to(dev)
                y = torch.from_numpy(chunk[:, 1:]).to(dev).reshape(-1)
                total = None
                for i in range(K):
                    with torch.no_grad(), autocast(dev, dtype):
                        out, _ = cache.get(i)(x)
                    total = out.float() if total is None else total + out.float()
                    nats[i] += F.cross_entropy((total / (i + 1)).reshape(-1, total.size(-1)), y, reduction="sum").item()
            n, nbytes = len(tb[s]), int(tb[s].sum())
            for k in range(1, K + 1):
                per_k[k - 1].update({f"logits_{s}_loss": nats[k - 1] / n, f"logits_{s}_bpb": nats[k - 1] / math.log(2) / nbytes})
        methods["logits"] = {f"{s}_{q}": per_k[-1][f"logits_{s}_{q}"] for s in splits for q in ("loss", "bpb")}

    if params and K > 1:
        try:
            avg = average_weights([m.path for m in members], lambda p: read_weights(p)[0])
            model, _, _ = load_model(members[0].path, dev)
            model.load_state_dict(avg)
            methods["params"] = {}
            for s in splits:
                r = _split_result(target_logprobs(model, tokens[s], T, batch_seqs, dev, dtype), tb[s])
                methods["params"].update({f"{s}_loss": r["loss"], f"{s}_bpb": r["bpb"]})
        except (ValueError, RuntimeError) as e:
            methods["params"] = {"skipped": str(e).splitlines()[0]}

    result = {"kind": "ensemble", "members": [m.label for m in members], "per_member": per_member, "per_k": per_k,
              "methods": methods, "dataset": {"path": str(ds.path), **fp}, "seq_len": T}
    if fitness_tokens > 0:
        result["selection"] = select_members(members, ds, fitness_tokens, select or K, lps, tb, dev, dtype, batch_seqs)
    return result


def fit_mixture(logprobs: np.ndarray, steps: int = 300) -> np.ndarray:
    """Softmax mixture weights maximizing mean log sum_k w_k p_k(target); logprobs (K, N)."""
    lp = torch.from_numpy(logprobs).double()
    theta = torch.zeros(lp.size(0), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=0.1)
    for _ in range(steps):
        loss = -torch.logsumexp(lp + torch.log_softmax(theta, 0)[:, None], dim=0).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.softmax(theta.detach(), 0).numpy()


def select_members(members: list[Member], ds: Dataset, fitness_tokens: int, keep: int, lps: dict, tb: dict,
                   dev: torch.device, dtype: str, batch_seqs: int) -> dict:
    """Gradient-based selection: mixture weights fitted on the fitness slice (carved from the end of
    the training split); the `keep` heaviest members, reweighted, are evaluated on val/test."""
    here = training_fingerprint(ds)
    for m in members:
        if m.train is None:
            raise EnsembleError(f"member {m.label}: cannot tell which training split it saw (no result.json beside its "
                                "weights, its dataset is gone); it cannot be selected on a fitness slice")
        try:
            require_comparable({**m.dataset, "train": m.train}, here, f"member {m.label} and the dataset {ds.path}",
                               COMPARABLE + ("train",))
        except DatasetError as e:
            raise EnsembleError(f"{e}: the fitness slice would hold tokens it trained on; it cannot be selected on them") from None
        if m.fitness_tokens < fitness_tokens:
            raise EnsembleError(f"member {m.label} trained on the last {fitness_tokens:,} training tokens "
                                f"(its data.fitness_tokens is {m.fitness_tokens}); it cannot be selected on them")
    fit_tokens = fitness_slice(ds, fitness_tokens)
    T = members[0].seq_len
    fit_lps = []
    for m in members:
        model, _, _ = load_model(m.path, dev)
        fit_lps.append(target_logprobs(model, fit_tokens, T, batch_seqs, dev, dtype))
        del model
    w = fit_mixture(np.stack(fit_lps))
    order = np.argsort(-w)[:keep]
    sel_w = w[order] / w[order].sum()
    out = {"fitness_slice": {"source": "training split", "tokens": fitness_tokens,
                             "offset": ds.num_tokens("train") - fitness_tokens, "note": "carved from the training budget; members never trained on it"},
           "weights": {members[i].label: float(w[i]) for i in range(len(members))},
           "selected": [members[i].label for i in order], "selected_weights": [float(x) for x in sel_w]}
    for s in lps:
        r = _split_result(prob_average([lps[s][i] for i in order], sel_w), tb[s])
        out.update({f"{s}_loss": r["loss"], f"{s}_bpb": r["bpb"]})
    return out


def describe(result: dict) -> str:
    splits = [s for s in ("val", "test") if f"{s}_loss" in result["per_member"][0]]
    lines = ["member  " + "".join(f"{s + ' loss':>11}" for s in splits) + "  label"]
    for r in result["per_member"]:
        lines.append(f"{r['member']:>6}  " + "".join(f"{r[f'{s}_loss']:>11.4f}" for s in splits) + f"  {r['label']}")
    has_logits = "logits" in result["methods"]
    lines.append("")
    lines.append("k  " + "".join(f"{'probs ' + s:>12}" for s in splits) + ("".join(f"{'logits ' + s:>13}" for s in splits) if has_logits else ""))
    for r in result["per_k"]:
        row = f"{r['k']:<3}" + "".join(f"{r[f'probs_{s}_loss']:>12.4f}" for s in splits)
        if has_logits and f"logits_{splits[0]}_loss" in r:
            row += "".join(f"{r[f'logits_{s}_loss']:>13.4f}" for s in splits)
        lines.append(row)
    for name, m in result["methods"].items():
        if "skipped" in m:
            lines.append(f"{name} averaging: skipped ({m['skipped']})")
        else:
            lines.append(f"{name} averaging: " + " | ".join(f"{s} loss {m[f'{s}_loss']:.4f}" for s in splits))
    if "selection" in result:
        sel = result["selection"]
        lines.append("selection on the fitness slice: " + ", ".join(f"{l} ({w:.2f})" for l, w in zip(sel["selected"], sel["selected_weights"]))
                     + " -> " + " | ".join(f"{s} loss {sel[f'{s}_loss']:.4f}" for s in splits))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------


DISTILL_MODES = ("chain", "ensemble")


def distill_mode(distill: bool | str) -> str:
    """The mode of `distill`: "" (none), "chain" (also for True) or "ensemble"; anything else is refused."""
    mode = "chain" if distill is True else (distill or "")
    if mode and mode not in DISTILL_MODES:
        raise EnsembleError(f"--distill: chain or ensemble, got {distill!r}")
    return mode


def member_overrides(overrides: dict, base_seed: int, k: int) -> dict:
    """Member k's overrides: the ensemble's, at seed `base_seed` + k."""
    return {**overrides, "train.seed": base_seed + k}


def train_ensemble(recipe: str, data: str, members: int, run_dir: str | Path, overrides: dict | None = None,
                   distill: bool | str = False, alpha: float | None = None, temperature: float | None = None,
                   parallel: int = 1, threads: int = -1, fitness_tokens: int = 0, select: int = 0, progress: bool = True,
                   log=print, gpus_per_job: int = 1, student_threads: int | None = None) -> dict:
    """Train (or continue) K members, then evaluate the ensemble; writes run_dir/result.json.
    On a CUDA machine the members run one per device (`gpus_per_job` devices each, through
    torchrun when > 1): see `jobs.run_jobs`. `distill`: False, "chain" (or True) or "ensemble"
    (see the module's docstring). `alpha`, `temperature`: None = the recipe's. `student_threads`:
    torch threads of a distilled member trained alone (default `threads`)."""
    mode = distill_mode(distill)
    if members < 1 or (mode == "ensemble" and members < 2):
        raise EnsembleError(f"--members must be >= {2 if mode == 'ensemble' else 1}"
                            f"{' (teachers and a student)' if mode == 'ensemble' else ''}, got {members}")
    student_threads = threads if student_threads is None else student_threads
    t0 = time.time()
    run_dir = Path(run_dir)
    over = dict(overrides or {})
    base_cfg = build_config(recipe, {**over, "data.path": data})  # validates the overrides once
    alpha = base_cfg.distill.alpha if alpha is None else alpha
    temperature = base_cfg.distill.temperature if temperature is None else temperature
    if fitness_tokens:
        over["data.fitness_tokens"] = fitness_tokens
    jobs = []
    for k in range(members):
        jobs.append(TrainJob(RunDir(run_dir).member(k), recipe, data, member_overrides(over, base_cfg.train.seed, k),
                             {"k": k}))
    # the members' elapsed time is known only when this call trains every one of them from scratch
    fresh = not any(j.run_dir.exists() for j in jobs)
    t_members = time.time()
    teach = {"distill.alpha": alpha, "distill.temperature": temperature}
    if mode == "chain":
        for k, job in enumerate(jobs):
            if k > 0:
                job.overrides.update({"distill.teacher": str(best_weights(jobs[k - 1].run_dir)), **teach})
            failures = run_jobs([job], 1, threads if k == 0 else student_threads, progress, desc=f"member {k}",
                                gpus_per_job=gpus_per_job)
            if failures:
                raise JobsFailed(failures, f"member {k} teaches the next: no later member was trained")
    elif mode == "ensemble":
        *teachers, student = jobs
        failures = run_jobs(teachers, parallel, threads, progress, desc="teachers", gpus_per_job=gpus_per_job)
        if failures:
            raise JobsFailed(failures, "the members teach the student: it was not trained")
        student.overrides.update({"distill.teacher": ",".join(str(best_weights(j.run_dir)) for j in teachers), **teach})
        failures = run_jobs([student], 1, student_threads, progress, desc="student", gpus_per_job=gpus_per_job)
        if failures:
            raise JobsFailed(failures, "the student: the ensemble was not evaluated")
    else:
        failures = run_jobs(jobs, parallel, threads, progress, desc="members", gpus_per_job=gpus_per_job)
        if failures:
            raise JobsFailed(failures, "the ensemble was not evaluated")
    t_eval = time.time()
    members_elapsed = t_eval - t_members
    result = evaluate_ensemble([str(j.run_dir) for j in jobs], data, fitness_tokens=fitness_tokens, select=select, log=log)
    eval_wall = time.time() - t_eval
    member_results = [j.result() for j in jobs]
    probs = result["methods"]["probs"]
    result.update({
        "recipe": recipe, "overrides": overrides or {}, "distill": {"enabled": bool(mode), "mode": mode or None, "alpha": alpha, "temperature": temperature},
        **{f"{k}": v for k, v in probs.items()},
        "wall_s": round(sum(r["wall_s"] for r in member_results) + eval_wall, 2),
        "tokens_seen": sum(r["tokens_seen"] for r in member_results),
        "tokens_per_s": float(np.mean([r["tokens_per_s"] for r in member_results])),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in member_results),
        "config": member_results[0]["config"], "seeds": [r["seed"] for r in member_results],
        "eval_wall_s": round(eval_wall, 2), "command_wall_s": round(time.time() - t0, 2),
        # wall_s sums the members' own times, however many ran at once; this is the clock's time for
        # training them all (null where some were trained by an earlier call)
        "members_elapsed_s": round(members_elapsed, 2) if fresh else None,
    })
    atomic_write_json(RunDir(run_dir).result, result)
    return result
