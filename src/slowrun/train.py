"""`slowrun train`: one flat training loop for CPU, one GPU, or many GPUs through torchrun.

setup (dataset, model, optimizers, loader, schedule, resume) -> the loop -> final
evaluation of every variant (final weights, EMA, SWA parameter and probability averages)
on val and test -> `result.json`. Rank 0 alone logs and writes. The state of the loop is
the step, the loader position, the optimizer and EMA state: all of it is checkpointed,
and the random state is a pure function of (seed, rank, step), so a resumed run repeats
the uninterrupted one exactly.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from . import SlowrunError, distributed
from .averaging import EMA, average_weights
from .checkpoint import (latest_good_checkpoint, list_checkpoints, load_model, read_weights, save_checkpoint,
                         save_weights)
from .config import ConfigError, RunConfig, config_from_dict, config_to_dict, config_to_toml
from .dataset import Dataset
from .evaluate import EvalResult, autocast, evaluate, prob_average, summarize, target_byte_counts, target_logprobs
from .gpt import GPT
from .losses import distill_loss
from .loader import TrainLoader
from .optim import build_optimizers
from .prepare import PrepareConfig, prepare
from .runlog import RunLogger, environment, fmt_time
from .schedules import Schedule
from .storage import atomic_write_json, atomic_write_text

DEFAULT_DATA = "data/builtin"


class TrainingError(SlowrunError):
    pass


def default_dataset(path: str = DEFAULT_DATA, progress: bool = True) -> Path:
    """The builtin default dataset (CPU-track 1x: bpe:8192, 262,144 train tokens), prepared if absent."""
    if not (Path(path) / "manifest.json").is_file():
        print(f"preparing the builtin dataset in {path} (once)", flush=True)
        prepare(PrepareConfig(out=path, progress=progress))
    return Path(path)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resolve(cfg: RunConfig, ds: Dataset) -> RunConfig:
    """Fill what the dataset decides (vocabulary size) and check batch arithmetic."""
    m = cfg.model
    if m.vocab_size == -1:
        m = replace(m, vocab_size=ds.vocab_size)
    elif m.vocab_size < ds.vocab_size:
        raise ConfigError(f"model.vocab_size: {m.vocab_size} is smaller than the dataset's vocabulary ({ds.vocab_size})")
    if cfg.train.batch_tokens % m.seq_len:
        raise ConfigError(f"train.batch_tokens: must be a multiple of model.seq_len={m.seq_len}, got {cfg.train.batch_tokens}")
    return replace(cfg, model=m, data=replace(cfg.data, path=str(ds.path)))


def _step_seed(seed: int, rank: int, step: int) -> int:
    return (seed * 1_000_003 + rank * 7919 + step) % (2**63 - 1)


def _fingerprint_matches(a: dict, b: dict) -> bool:
    return a.get("tokenizer") == b.get("tokenizer")


def train(cfg: RunConfig | None, run_dir: str | Path, resume: bool = False, echo: bool = True) -> dict:
    """Train one model; returns the result dict (also written to run_dir/result.json on rank 0)."""
    run_dir = Path(run_dir)
    if resume:
        if not (run_dir / "config.toml").is_file():
            raise TrainingError(f"--resume {run_dir}: no run there (config.toml missing)")
        from .config import tomllib

        cfg = config_from_dict(tomllib.loads((run_dir / "config.toml").read_text()))
        if (run_dir / "result.json").is_file():
            import json

            if echo:
                print(f"{run_dir} already finished; result.json is unchanged", flush=True)
            return json.loads((run_dir / "result.json").read_text())
    assert cfg is not None
    env = distributed.init(cfg.train.device)
    try:
        return _train(cfg, run_dir, resume, echo, env)
    finally:
        distributed.shutdown(env)


def _train(cfg: RunConfig, run_dir: Path, resume: bool, echo: bool, env: distributed.DistEnv) -> dict:
    t_start = time.time()
    device = env.device
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # denormals slow CPU matmuls by 10x (seen with N(0,1) embeddings)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    data_path = cfg.data.path
    if not data_path:
        if env.is_main:
            default_dataset(progress=echo)
        distributed.barrier(env)
        data_path = DEFAULT_DATA
    ds = Dataset.open(data_path, verify=True)
    cfg = resolve(cfg, ds)
    T = cfg.model.seq_len
    batch_seqs = cfg.train.batch_tokens // T
    if batch_seqs % env.world_size:
        raise ConfigError(f"train.batch_tokens: {batch_seqs} sequences per step do not split over {env.world_size} ranks")
    per_rank = batch_seqs // env.world_size
    micro = per_rank if cfg.train.micro_batch_tokens == -1 else max(1, cfg.train.micro_batch_tokens // T)
    if per_rank % micro:
        raise ConfigError(f"train.micro_batch_tokens: {per_rank} sequences per rank are not a multiple of {micro} per micro-batch")
    accum = per_rank // micro

    # run directory -------------------------------------------------------------------
    if env.is_main:
        if not resume and (run_dir / "config.toml").exists():
            raise TrainingError(f"--run-dir {run_dir} already holds a run; use --resume {run_dir} or another --run-dir")
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.toml", config_to_toml(cfg))

    loader = TrainLoader(ds, T, batch_seqs, cfg.train.seed, cfg.data.doc_shuffle, cfg.data.seq_shuffle,
                         env.rank, env.world_size, cfg.data.fitness_tokens)
    steps_per_epoch = loader.seqs_per_epoch / batch_seqs
    total_steps = cfg.train.max_steps if cfg.train.max_steps > 0 else max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    sched = Schedule(total_steps, steps_per_epoch, cfg.optim, cfg.train.snapshot_cycles)
    log = RunLogger(run_dir, env.is_main, echo, total_steps, cfg.train.progress, cfg.train.wandb, cfg.train.tensorboard,
                    config_to_dict(cfg))

    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model).to(device)
    opt = build_optimizers(model, cfg.optim, device)
    ema = EMA(model, cfg.optim.ema_decay, cfg.optim.ema_every) if cfg.optim.ema_decay > 0 else None
    teacher = None
    if cfg.distill.teacher:
        teacher, tcfg, textra = load_model(cfg.distill.teacher, device)
        if textra.get("dataset") and not _fingerprint_matches(textra["dataset"], ds.fingerprint):
            raise TrainingError(f"distill.teacher {cfg.distill.teacher} was trained with another tokenizer")
        teacher.eval()
    fwd_model = torch.compile(model) if cfg.train.compile else model

    step, elapsed_before = 0, 0.0
    if resume:
        ck = latest_good_checkpoint(run_dir, log=log.line)
        if ck is not None:
            model.load_state_dict(ck.model)
            opt.load_state_dict(ck.optimizer_states(len(opt.optimizers)))
            loader.load_state_dict(ck.state["extra"]["loader"])
            if ema is not None and ck.ema() is not None:
                ema.load_raw_state(ck.ema())
            step, elapsed_before = ck.step, float(ck.state["extra"].get("elapsed_s", 0.0))
            log.line(f"resumed from {ck.path} at step {step}")
        else:
            log.line("no usable checkpoint: starting from step 0")

    env_info = environment(device)
    if step == 0:
        for k, v in env_info.items():
            log.line(f"# {k}: {v}", echo=k in ("device", "git_commit"))
        log.line(f"# dataset: {ds.path} ({ds.num_tokens('train'):,} train tokens, tokenizer {ds.manifest['tokenizer']['id']})")
        log.line(f"# model: {model.num_params():,} parameters ({model.num_params(exclude_embeddings=True):,} without "
                 f"embeddings), {model.flops_per_token():,} FLOPs/token")
        log.line(f"# steps: {total_steps} x {cfg.train.batch_tokens:,} tokens ({steps_per_epoch:.2f} steps/epoch, "
                 f"{accum} micro-batches of {micro} x {T} per rank, {env.world_size} rank(s))")
        for text in config_to_toml(cfg).splitlines():
            log.line(f"# {text}" if text else "#", echo=False)

    swa_dir = run_dir / "swa"
    params = [p for p in model.parameters()]
    tokens_per_step = batch_seqs * T
    t_loop = time.time()
    steps_timed, time_in_steps = 0, 0.0
    last_ckpt: Path | None = list_checkpoints(run_dir)[-1] if env.is_main and list_checkpoints(run_dir) else None

    def checkpoint() -> None:
        nonlocal last_ckpt
        if env.is_main:
            extra = {"loader": loader.state_dict(), "elapsed_s": elapsed_before + time.time() - t_loop,
                     "epochs_done": loader.epochs_done}
            last_ckpt = save_checkpoint(run_dir, step, cfg, model.state_dict(), opt.state_dict(), extra, {},
                                        ema.raw_state() if ema is not None else None, cfg.train.keep_checkpoints)

    def val_eval(kind: str) -> None:
        if env.is_main:
            r = evaluate(model, ds.tokens("val"), T, ds.token_bytes, cfg.eval.batch_seqs, device, cfg.train.dtype,
                         cfg.eval.max_tokens)
            log.line(f"eval  step {step:>6}/{total_steps} | epoch {loader.epochs_done:.2f} | val loss {r.loss:.4f} | "
                     f"val bpb {r.bpb:.4f} ({kind})")
            log.metrics({"kind": "eval", "step": step, "epoch": loader.epochs_done, "val_loss": r.loss, "val_bpb": r.bpb,
                         "targets": r.targets, "at": kind})
        distributed.barrier(env)

    # the loop ------------------------------------------------------------------------
    model.train()
    while step < total_steps:
        t0 = time.time()
        torch.manual_seed(_step_seed(cfg.train.seed, env.rank, step))
        epoch_before = loader.epoch
        model.loop_active = cfg.model.loop_start >= 0 and epoch_before >= cfg.model.loop_from_epoch
        lr_mult, wd_mult = sched.lr(step), sched.wd(step)
        opt.set_schedule(lr_mult, wd_mult, sched.momentum(step))
        x_all, y_all = loader.next_batch()
        loss_sum = torch.zeros((), device=device)
        for i in range(accum):
            x = x_all[i * micro:(i + 1) * micro].to(device, non_blocking=True)
            y = y_all[i * micro:(i + 1) * micro].to(device, non_blocking=True)
            with autocast(device, cfg.train.dtype):
                logits, loss = fwd_model(x, y, return_logits=teacher is not None)
                if teacher is not None:
                    with torch.no_grad():
                        t_logits, _ = teacher(x)
                    loss = distill_loss(logits, t_logits, y, cfg.distill.alpha, cfg.distill.temperature)
            (loss / accum).backward()
            loss_sum += loss.detach()
        for p in params:
            if p.grad is None:  # e.g. a block skipped by stochastic depth on this rank
                p.grad = torch.zeros_like(p)
        reduce = [p.grad for p in params] + [loss_sum]
        distributed.all_reduce_mean(reduce, env)
        train_loss = loss_sum.item() / accum
        if not math.isfinite(train_loss):
            where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
            log.line(f"stopping: loss is {train_loss} at step {step + 1}; {where}")
            log.close()
            raise TrainingError(f"loss became {train_loss} at step {step + 1} (lower optim lr or check the data); {where}")
        gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf))
        opt.step()
        opt.zero_grad()
        step += 1
        if ema is not None:
            ema.update(model, step)
        dt = time.time() - t0
        if step > 1 or total_steps == 1:  # the first step (allocation, compilation) is not representative
            steps_timed, time_in_steps = steps_timed + 1, time_in_steps + dt
        tok_s = tokens_per_step * steps_timed / time_in_steps if steps_timed else tokens_per_step / dt
        if step % cfg.train.log_every == 0 or step == total_steps:
            eta = (total_steps - step) * (time_in_steps / steps_timed if steps_timed else dt)
            log.line(f"step {step:>6}/{total_steps} | epoch {loader.epochs_done:6.2f} | loss {train_loss:.4f} | "
                     f"lr {lr_mult:.3f} | gnorm {gnorm:.3f} | {tok_s:,.0f} tok/s | "
                     f"elapsed {fmt_time(elapsed_before + time.time() - t_loop)} | ETA {fmt_time(eta)}")
            log.metrics({"kind": "train", "step": step, "epoch": loader.epochs_done, "loss": train_loss, "lr_mult": lr_mult,
                         "wd_mult": wd_mult, "grad_norm": gnorm, "tokens_per_s": tok_s, "step_s": dt, "tokens": step * tokens_per_step})
        log.progress(step)

        cycle = sched.cycle_end(step - 1)
        if cycle is not None:
            if env.is_main:
                save_weights(swa_dir / f"cycle_{cycle:03d}.safetensors", model.state_dict(), cfg,
                             {"dataset": ds.fingerprint, "step": step, "cycle": cycle})
            if cfg.train.snapshot_cycles and cfg.train.snapshot_noise > 0 and step < total_steps:
                perturb(model, cfg.train.snapshot_noise, _step_seed(cfg.train.seed, 0, step))
        epoch_end = loader.epoch > epoch_before
        if epoch_end and cfg.eval.at_epoch_end and step < total_steps:
            val_eval(f"epoch {loader.epoch} end")
        elif cfg.eval.every_steps > 0 and step % cfg.eval.every_steps == 0 and step < total_steps:
            val_eval("periodic")
        if step < total_steps and (epoch_end or (cfg.train.checkpoint_every > 0 and step % cfg.train.checkpoint_every == 0)):
            checkpoint()

    # the end -------------------------------------------------------------------------
    train_wall = elapsed_before + time.time() - t_loop
    checkpoint()
    result: dict = {}
    if env.is_main:
        fp = {"dataset": ds.fingerprint, "step": step}
        if cfg.train.save_final:
            save_weights(run_dir / "model.safetensors", model.state_dict(), cfg, fp)
        if ema is not None:
            save_weights(run_dir / "ema.safetensors", ema.state_dict(), cfg, fp)
        result = final_evaluation(model, cfg, ds, run_dir, ema, log, device)
        tokens_seen = step * tokens_per_step
        result.update({
            "run_dir": str(run_dir), "steps": step, "tokens_seen": tokens_seen, "unique_tokens": loader.num_tokens,
            "epochs": tokens_seen / loader.num_tokens, "wall_s": round(time.time() - t_start + elapsed_before, 2),
            "train_wall_s": round(train_wall, 2), "tokens_per_s": round(tokens_per_step * steps_timed / max(time_in_steps, 1e-9), 1),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "peak_gpu_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None,
            "params": model.num_params(), "flops_per_token": model.flops_per_token(), "world_size": env.world_size,
            "dataset": {"path": str(ds.path), **ds.fingerprint, "train": ds.manifest["files"].get("train.bin"),
                        "train_tokens": ds.num_tokens("train"),
                        "fitness_tokens": cfg.data.fitness_tokens},
            "seed": cfg.train.seed, "environment": env_info, "config": config_to_dict(cfg),
        })
        atomic_write_json(run_dir / "result.json", result)
        log.line(result_table(result))
    log.close()
    distributed.barrier(env)
    return result


@torch.no_grad()
def perturb(model: torch.nn.Module, scale: float, seed: int) -> None:
    """Snapshot ensembles: add N(0, (scale * rms(p))^2) noise to every matrix at a cycle start
    (the same noise on every rank)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.ndim >= 2:
            rms = p.float().pow(2).mean().sqrt()
            p.add_((torch.randn(p.shape, generator=g) * scale * rms).to(p.device, p.dtype))


def final_evaluation(model: GPT, cfg: RunConfig, ds: Dataset, run_dir: Path, ema: EMA | None, log: RunLogger,
                     device: torch.device) -> dict:
    """Val and test loss/bpb of: the final weights, the EMA, the SWA (or snapshot) parameter
    average and probability average. `best` is the variant with the lowest val loss."""
    T, bs, dt = cfg.model.seq_len, cfg.eval.batch_seqs, cfg.train.dtype
    splits = ["val"] + (["test"] if cfg.eval.test and ds.num_tokens("test") > T + 1 else [])
    tb = {s: target_byte_counts(ds.tokens(s), T, ds.token_bytes) for s in splits}
    variants: dict[str, dict] = {}

    def record(name: str, lps: dict[str, np.ndarray]) -> None:
        res = {}
        for s in splits:
            r: EvalResult = summarize(lps[s], tb[s])
            res.update({f"{s}_loss": r.loss, f"{s}_bpb": r.bpb})
        variants[name] = res
        log.line(f"final {name:<11} " + " | ".join(f"{k} {v:.4f}" for k, v in res.items()))

    def logprobs_of(m: torch.nn.Module) -> dict[str, np.ndarray]:
        return {s: target_logprobs(m, ds.tokens(s), T, bs, device, dt) for s in splits}

    record("final", logprobs_of(model))
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    if ema is not None:
        model.load_state_dict(ema.state_dict())
        record("ema", logprobs_of(model))
    snaps = sorted((run_dir / "swa").glob("cycle_*.safetensors"))
    if snaps:
        members = []
        for p in snaps:
            state, _, _ = read_weights(p)
            model.load_state_dict(state)
            members.append(logprobs_of(model))
        label = "snapshot" if cfg.train.snapshot_cycles else "swa"
        if len(snaps) > 1:
            record(f"{label}_probs", {s: prob_average([m[s] for m in members]) for s in splits})
        avg = average_weights(snaps, lambda p: read_weights(p)[0])
        model.load_state_dict(avg)
        record(f"{label}_params", logprobs_of(model))
        if cfg.train.save_final:
            save_weights(run_dir / f"{label}_avg.safetensors", avg, cfg, {"dataset": ds.fingerprint})
    model.load_state_dict(saved)
    best = min(variants, key=lambda k: variants[k]["val_loss"])
    return {"variants": variants, "best": best, **{k: v for k, v in variants[best].items()}}


def result_table(result: dict) -> str:
    rows = [f"{'variant':<16}{'val loss':>10}{'val bpb':>10}{'test loss':>11}{'test bpb':>10}"]
    for name, v in result["variants"].items():
        rows.append(f"{name + (' *' if name == result['best'] else ''):<16}{v['val_loss']:>10.4f}{v['val_bpb']:>10.4f}"
                    f"{v.get('test_loss', float('nan')):>11.4f}{v.get('test_bpb', float('nan')):>10.4f}")
    rows.append(f"(* = best on val) {result['steps']} steps, {result['tokens_seen']:,} tokens seen "
                f"({result['epochs']:.1f} epochs of {result['unique_tokens']:,}), {fmt_time(result['wall_s'])}, "
                f"{result['tokens_per_s']:,.0f} tok/s")
    return "\n".join(rows)
