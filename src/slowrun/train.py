"""`slowrun train`: one flat training loop for CPU, one GPU, or many GPUs through torchrun.

setup (dataset, model, optimizers, loader, schedule, resume) -> fit (the loop) -> finish
(the final evaluation of every weights variant, `final_eval.final_evaluation`: final weights,
EMA, SWA parameter and probability averages, on val and test -> `result.json`). Rank 0 alone logs and writes. The state of
the loop is the step, the loader position, the optimizer and EMA state: all of it is
checkpointed, and the random state is a pure function of (seed, rank, step), so a resumed
run repeats the uninterrupted one exactly.

A run directory (its files: `rundir`) is locked (`flock` on RUN_DIR/.lock) for the whole run, so a second
`--resume` of it is refused. SIGINT and SIGTERM finish the current step, write a
checkpoint and stop with the command that resumes it.
"""

from __future__ import annotations

import contextlib
import math
import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from . import SlowrunError, distributed
from .averaging import EMA
from .checkpoint import (Checkpoint, latest_good_checkpoint, list_checkpoints, load_model, remove_checkpoint_leftovers,
                         save_checkpoint, save_weights, sidecar)
from .config import ConfigError, RunConfig, config_from_dict, config_to_dict, config_to_toml, distill_teachers, section_defaults, tomllib
from .curriculum import document_scores
from .dataset import Dataset, require_comparable
from .evaluate import autocast, evaluate, split_tokens
from .final_eval import final_evaluation, result_table
from .gpt import GPT, loop_active_at, stoch_depth_scales, window_stage_of
from .loader import TrainLoader
from .losses import DistillTarget, compile_kernels
from .optim import Optimizers, build_optimizers, store_bf16
from .prepare import DEFAULT_DATA, default_dataset
from .results import ResultError, read_result
from .rundir import CONFIG, LOCK, START_FILES, RunDir
from .runlog import RunLogger, StepTimer, environment, fmt_time, require_backends
from .schedules import Schedule
from .steps import seqs_per_step, step_plan
from .storage import atomic_write_json, atomic_write_text, exclusive_lock


class TrainingError(SlowrunError):
    pass


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training after a checkpoint; `exit_code` is 128 + the signal number."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resolve(cfg: RunConfig, ds: Dataset, device: torch.device | None = None) -> RunConfig:
    """Fill what the dataset decides (vocabulary size, the absolute data path) and what the machine
    decides (train.dtype: fp32 where bf16 has no hardware, `distributed.compute_dtype`; `device`:
    where the run trains, train.device's when None), and check batch arithmetic. A run records the
    result, and a ledger looks runs up by it: on each machine, runs of the precision it trains in."""
    dev = distributed.resolve_device(cfg.train.device) if device is None else device
    cfg = replace(cfg, train=replace(cfg.train, dtype=distributed.compute_dtype(cfg.train.dtype, dev)))
    m = cfg.model
    if m.vocab_size == -1:
        m = replace(m, vocab_size=ds.vocab_size)
    elif m.vocab_size < ds.vocab_size:
        raise ConfigError(f"model.vocab_size: {m.vocab_size} is smaller than the dataset's vocabulary ({ds.vocab_size})")
    cfg = replace(cfg, model=m, data=replace(cfg.data, path=str(ds.path.resolve())))  # absolute: `--resume` from anywhere
    seqs_per_step(cfg)  # train.batch_tokens a multiple of model.seq_len
    return cfg


def _loop_active(cfg: RunConfig, epoch: int) -> bool:
    """Layer looping (model.loop_start >= 0) runs from epoch model.loop_from_epoch on."""
    return loop_active_at(cfg.model, epoch)


def _step_seed(seed: int, rank: int, step: int) -> int:
    return (seed * 1_000_003 + rank * 7919 + step) % (2**63 - 1)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old: dict, new: dict) -> list[str]:
    """`key old -> new` for every config key whose value differs (old, new: config_to_dict forms).
    A key one side lacks counts at its default in this version: a field added after a checkpoint
    was written, with a default that keeps the old behaviour, is no change."""
    a, b = _flat(old), _flat(new)

    def value(d: dict, k: str) -> Any:
        section, _, name = k.partition(".")
        return d[k] if k in d else section_defaults(section).get(name, "(absent)")

    return [f"{k} {value(a, k)!r} -> {value(b, k)!r}" for k in sorted(set(a) | set(b)) if value(a, k) != value(b, k)]


class StopSignals:
    """While active, SIGINT and SIGTERM only set `signum`; the loop stops after the step it is in.
    A second signal stops at once (KeyboardInterrupt), for a step that takes too long.

    Handlers can only be installed from the main thread; elsewhere (a thread calling
    `train`) signals keep their default behaviour.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)


def train(cfg: RunConfig | None, run_dir: str | Path, resume: bool = False, echo: bool = True,
          force: bool = False) -> dict:
    """Train one model; returns the result dict (also written to run_dir/result.json on rank 0).

    With `resume`, the config is the run's config.toml; it must equal the config inside the
    checkpoint unless `force`.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainingError(f"--run-dir {run_dir}: exists and is not a directory")
    if resume:
        cfg = _read_run_config(run_dir)
        if RunDir(run_dir).finished():
            try:
                result = read_result(run_dir)
            except ResultError as e:
                raise TrainingError(f"{e}; the run had finished: move the file away to evaluate its final "
                                    "checkpoint again") from None
            if echo:
                print(f"{run_dir} already finished; result.json is unchanged", flush=True)
            return result
    assert cfg is not None
    env = distributed.init(cfg.train.device, cfg.train.dist_timeout_min)
    threads = torch.get_num_threads()  # setup sets train.num_threads; the caller gets its own back
    try:
        if not env.is_main:
            return _train(cfg, run_dir, resume, force, echo, env)
        with exclusive_lock(RunDir(run_dir).lock, f"run directory {run_dir}"):
            return _train(cfg, run_dir, resume, force, echo, env)
    finally:
        torch.set_num_threads(threads)
        distributed.shutdown(env)


def _read_run_config(run_dir: Path) -> RunConfig:
    path = RunDir(run_dir).config
    if not path.is_file():
        raise TrainingError(f"--resume {run_dir}: no run there ({CONFIG} missing)")
    try:
        return config_from_dict(tomllib.loads(path.read_text()))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise TrainingError(f"{path}: not valid TOML ({e})") from None


def _train(cfg: RunConfig, run_dir: Path, resume: bool, force: bool, echo: bool, env: distributed.DistEnv) -> dict:
    t_start = time.time()
    if env.is_main:  # under the run's lock: no live writer of them
        remove_checkpoint_leftovers(run_dir)
    run = setup(cfg, run_dir, resume, force, echo, env)
    try:
        stats = fit(run)
        return finish(run, stats, t_start)
    finally:
        run.log.close()


# ---------------------------------------------------------------------------------------
# setup


@dataclass
class Run:
    """Everything the loop and the final evaluation share."""

    cfg: RunConfig
    run_dir: Path
    env: distributed.DistEnv
    ds: Dataset
    loader: TrainLoader
    sched: Schedule
    model: GPT
    fwd_model: torch.nn.Module  # the model, compiled if train.compile
    opt: Optimizers
    ema: EMA | None
    teachers: list[GPT]  # distill.teacher: one, or an ensemble's members
    log: RunLogger
    total_steps: int
    micro_seqs: int  # sequences per micro-batch
    accum: int  # micro-batches per step and rank
    shard: distributed.ShardedStep | None = None  # train.shard_optimizer
    step: int = 0
    elapsed_before_s: float = 0.0  # training time of the run before this process (resume)
    timed: tuple[int, float] = (0, 0.0)  # steps timed and their seconds, over every process of the run
    env_info: dict | None = None

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train.batch_tokens


def _failed_start(run_dir: Path) -> bool:
    """config.toml but no checkpoint, no final weights and no result: nothing a new start would lose."""
    rd = RunDir(run_dir)
    return rd.config.is_file() and not list_checkpoints(run_dir) and not rd.result.exists() and not rd.weights().exists()


def _check_fresh_run_dir(run_dir: Path, echo: bool) -> None:
    """Refuse a directory holding a run or other files; clear a failed start's files (said in a line)."""
    if _failed_start(run_dir):
        for name in START_FILES:
            (run_dir / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            RunDir(run_dir).checkpoints.rmdir()  # only when empty
        print(f"note: {run_dir} held a start that stopped before its first checkpoint; starting it anew", file=sys.stderr, flush=True)
    if RunDir(run_dir).config.exists():
        raise TrainingError(f"--run-dir {run_dir} already holds a run; use --resume {run_dir} or another --run-dir")
    others = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK) if run_dir.is_dir() else []
    if others:
        raise TrainingError(f"--run-dir {run_dir}: not empty and not a slowrun run (holds {', '.join(others[:3])}"
                            f"{', ...' if len(others) > 3 else ''}); choose an empty or new directory")


def setup(cfg: RunConfig, run_dir: Path, resume: bool, force: bool, echo: bool, env: distributed.DistEnv) -> Run:
    """Dataset, model, optimizers, loader, schedule and the resumed state. Everything that can
    refuse the run is checked before config.toml is written, so a failed start leaves the
    run directory reusable."""
    device = env.device
    require_backends(cfg.train.wandb, cfg.train.tensorboard)
    if env.is_main and not resume:
        _check_fresh_run_dir(run_dir, echo)
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
    given, resolved = cfg.train.dtype, resolve(cfg, ds, device)
    # a resumed run keeps the precision of its config.toml, resolved when it started (an exact resume)
    cfg = replace(resolved, train=cfg.train) if resume else resolved
    notes = [] if cfg.train.dtype == given else [
        f"train.dtype: {given} -> {cfg.train.dtype}: this {device.type.upper()} has no bf16 arithmetic, where emulated "
        f"bf16 runs ~20x slower than fp32 (on a CPU, {distributed.CPU_BF16_ENV}=1 keeps bf16)"]
    T = cfg.model.seq_len
    steps = step_plan(cfg, ds.num_tokens("train"), env.world_size)
    chunks = ds.num_tokens("val") // (T + 1)  # an evaluation scores whole chunks (eval.reference_batch: batches of them)
    if chunks == 0:
        raise ConfigError(f"model.seq_len: {T} needs val chunks of {T + 1:,} tokens, but {ds.path}'s val split holds "
                          f"{ds.num_tokens('val'):,} tokens")
    if chunks < cfg.eval.reference_batch:
        raise ConfigError(f"eval.reference_batch: {cfg.eval.reference_batch} chunks make a batch, but {ds.path}'s val split "
                          f"holds {chunks} chunks of {T + 1} tokens")
    scores = None
    if cfg.data.curriculum != "off":  # rank 0 scores (and caches) first, the others read its cache
        if env.is_main:
            scores = document_scores(ds, cfg.data.curriculum_score, T, cfg.data.fitness_tokens, str(device))
        distributed.barrier(env)
        if not env.is_main:
            scores = document_scores(ds, cfg.data.curriculum_score, T, cfg.data.fitness_tokens, str(device))
    try:
        loader = TrainLoader(ds, T, steps.seqs_per_step, cfg.train.seed, cfg.data.doc_shuffle, cfg.data.seq_shuffle,
                             env.rank, env.world_size, cfg.data.fitness_tokens, cfg.data.curriculum, scores,
                             cfg.data.curriculum_blocks, cfg.data.chunking, cfg.data.epoch_multiple)
    except ValueError as e:
        raise TrainingError(f"{ds.path}: {e}") from None
    total_steps = steps.total_steps
    sched = Schedule(total_steps, steps.steps_per_epoch, cfg.optim, cfg.train.snapshot_cycles)

    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model).to(device)
    store_bf16(model, cfg.optim)  # optim.bf16_params: those weights and their AdamW state in bf16
    opt = build_optimizers(model, cfg.optim, device)
    if cfg.train.shard_optimizer and cfg.optim.matrix_optimizer != "muon":
        raise ConfigError(f"train.shard_optimizer: not with optim.matrix_optimizer={cfg.optim.matrix_optimizer} (its state is not per tensor)")
    shard = distributed.ShardedStep(list(model.parameters()), env) if cfg.train.shard_optimizer else None
    ema_start = round(cfg.optim.ema_start_frac * total_steps) if cfg.optim.ema_start_frac > 0 else None  # None: from step 0
    ema = EMA(model, cfg.optim.ema_decay, cfg.optim.ema_every, ema_start) if cfg.optim.ema_decay > 0 else None
    teachers = []
    for path in distill_teachers(cfg.distill):
        teacher, _, textra = load_model(path, device)
        if textra.get("dataset"):
            require_comparable(textra["dataset"], ds.fingerprint, f"distill.teacher {path} and the dataset {ds.path}")
        teachers.append(teacher)  # in eval mode from the training loop's start

    warnings: list[str] = notes
    ck: Checkpoint | None = latest_good_checkpoint(run_dir, log=warnings.append) if resume else None
    if resume and ck is None and warnings:
        # restarting from step 0 would silently throw away the run's progress
        raise TrainingError(f"--resume {run_dir}: none of its checkpoints verifies ({warnings[-1]}); nothing was changed")
    if ck is not None:
        changes = config_changes(ck.state["config"], config_to_dict(cfg))
        if changes and not force:
            raise TrainingError(f"{RunDir(run_dir).config} differs from the config of {ck.path.name}: "
                                f"{'; '.join(changes)}; undo the edit, or pass --force to continue with config.toml")
        if changes:
            warnings.append(f"warning: --force: continuing with the edited config.toml ({'; '.join(changes)})")
        try:
            model.load_state_dict(ck.model)
            opt.load_state_dict(ck.optimizer_states(len(opt.optimizers)))
        except (RuntimeError, ValueError, KeyError) as e:  # --force with an edit that changes a tensor's shape
            raise TrainingError(f"--resume {run_dir}: {ck.path.name} does not fit the model of config.toml "
                                f"({str(e).splitlines()[0][:200]}); undo the edit") from None
        if shard is not None:
            shard.keep_own_state(opt.optimizers)
        loader.load_state_dict(ck.state["extra"]["loader"])
        if ema is not None and ck.ema() is not None:
            ema.load_raw_state(ck.ema())

    # nothing below refuses the run: only now does the run directory get its files
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            atomic_write_text(RunDir(run_dir).config, config_to_toml(cfg))
    log = RunLogger(run_dir, env.is_main, echo, total_steps, cfg.train.progress, cfg.train.wandb, cfg.train.tensorboard,
                    config_to_dict(cfg))
    for text in warnings:
        log.warn(text)
    compile_kernels(cfg.train.compile_loss, log.warn)
    fwd_model = model
    if cfg.train.compile and cfg.train.compile_scope == "blocks":
        model.compile_blocks(cfg.train.compile_backend)
    elif cfg.train.compile:
        fwd_model = torch.compile(model, backend=cfg.train.compile_backend)
    run = Run(cfg, run_dir, env, ds, loader, sched, model, fwd_model, opt, ema,
              teachers, log, total_steps, steps.micro_seqs, steps.accum, shard, env_info=environment(device))
    if ck is not None:
        run.step, run.elapsed_before_s = ck.step, float(ck.state["extra"].get("elapsed_s", 0.0))
        run.timed = tuple(ck.state["extra"].get("timed", (0, 0.0)))
        log.line(f"resumed from {ck.path} at step {run.step}")
    elif resume:
        log.line("no usable checkpoint: starting from step 0")
    if run.step == 0:
        for k, v in run.env_info.items():
            log.line(f"# {k}: {v}", echo=k in ("device", "git_commit"))
        log.line(f"# dataset: {ds.path} ({ds.num_tokens('train'):,} train tokens, tokenizer {ds.manifest['tokenizer']['id']})")
        log.line(f"# model: {model.num_params():,} parameters ({model.num_params(exclude_embeddings=True):,} without "
                 f"embeddings), {model.flops_per_token():,} FLOPs/token")
        log.line(f"# steps: {total_steps} x {steps.tokens_per_step:,} tokens ({steps.steps_per_epoch:.2f} steps/epoch, "
                 f"{steps.accum} micro-batches of {steps.micro_seqs} x {T} per rank, {env.world_size} rank(s))")
        for text in config_to_toml(cfg).splitlines():
            log.line(f"# {text}" if text else "#", echo=False)
    return run


def write_checkpoint(run: Run, elapsed_s: float) -> Path | None:
    """Checkpoint the loop's whole state at run.step (rank 0 writes; every rank calls it: a
    sharded optimizer's state is gathered first)."""
    opt_state = run.shard.gather_state(run.opt.optimizers) if run.shard is not None else None
    if not run.env.is_main:
        return None
    extra = {"loader": run.loader.state_dict(), "elapsed_s": elapsed_s, "epochs_done": run.loader.epochs_done, "timed": run.timed}
    return save_checkpoint(run.run_dir, run.step, run.cfg, run.model.state_dict(), opt_state or run.opt.state_dict(), extra,
                           run.ema.raw_state() if run.ema is not None else None, run.cfg.train.keep_checkpoints)


def save_epoch_snapshot(run: Run, epoch: int) -> None:
    """The weights at an epoch's end, the last `train.epoch_snapshots` kept (rank 0)."""
    rd = RunDir(run.run_dir)
    save_weights(rd.epoch_snapshot(epoch), run.model.state_dict(), run.cfg,
                 {"dataset": run.ds.fingerprint, "step": run.step, "epoch": epoch, "loop_active": run.model.loop_active})
    for old in rd.snapshots("epochs_probs")[:-run.cfg.train.epoch_snapshots]:
        old.unlink()
        sidecar(old).unlink(missing_ok=True)


def eval_val(run: Run, at: str) -> None:
    """Val loss of the current weights, logged (sharded: every rank scores its share of the chunks)."""
    cfg = run.cfg
    r = evaluate(run.model, split_tokens(run.ds, "val", cfg.model.seq_len, cfg.eval.reference_batch), cfg.model.seq_len, run.ds.token_bytes, cfg.eval.batch_seqs,
                 run.env.device, cfg.train.dtype, cfg.eval.max_tokens, env=run.env)
    if run.env.is_main:
        run.log.line(f"eval  step {run.step:>6}/{run.total_steps} | epoch {run.loader.epochs_done:.2f} | "
                     f"val loss {r.loss:.4f} | val bpb {r.bpb:.4f} ({at})")
        run.log.metrics({"kind": "eval", "step": run.step, "epoch": run.loader.epochs_done, "val_loss": r.loss,
                         "val_bpb": r.bpb, "targets": r.targets, "at": at})


# ---------------------------------------------------------------------------------------
# fit


@dataclass
class FitStats:
    train_wall_s: float
    steps_timed: int  # steps after the first (which includes allocation and compilation)
    time_in_steps_s: float


def fit(run: Run) -> FitStats:
    """The training loop, from run.step to run.total_steps."""
    cfg, env, model, loader, sched, log, opt, ema = run.cfg, run.env, run.model, run.loader, run.sched, run.log, run.opt, run.ema
    device, micro, total_steps = env.device, run.micro_seqs, run.total_steps
    params = list(model.parameters())
    t_loop = time.time()
    steps_timed, time_in_steps = run.timed
    first_step = run.step  # where this process starts (resume)
    last_ckpt: Path | None = (list_checkpoints(run.run_dir) or [None])[-1] if env.is_main else None
    model.train()
    for teacher in run.teachers:
        teacher.eval()
    with StopSignals() as signals:
        timer = StepTimer(device)
        while run.step < total_steps:
            t0 = time.time()
            timer.start()
            torch.manual_seed(_step_seed(cfg.train.seed, env.rank, run.step))
            epoch_before = loader.epoch
            loop_active = _loop_active(cfg, epoch_before)
            model.loop_active = loop_active  # what an evaluation of this state runs
            if model.window_stage >= 0:  # model.window_schedule: this epoch's windows, RoPE tables and scale
                model.set_window_stage(window_stage_of(cfg.model, epoch_before))
            if cfg.train.compile and cfg.train.compile_scope == "model":  # band masks outside the compiled graph
                # (an eager forward, blocks compiled apart included, prepares its own)
                model.prepare_attention(cfg.model.seq_len, device)
            lr_mult, wd_mult = sched.lr(run.step), sched.wd(run.step)
            opt.set_schedule(lr_mult, wd_mult, sched.momentum(run.step))
            depth_scales = stoch_depth_scales(cfg.model, cfg.train.seed, run.step, loop_active)  # the same on every rank
            x_all, y_all = loader.next_batch()
            loss_sum = torch.zeros((), device=device)
            for i in range(run.accum):
                if cfg.model.stoch_depth_per_call and i > 0:  # the reference draws again at every micro-step
                    depth_scales = stoch_depth_scales(cfg.model, cfg.train.seed, run.step, loop_active, micro=i)
                x = x_all[i * micro:(i + 1) * micro].to(device, non_blocking=True)
                y = y_all[i * micro:(i + 1) * micro].to(device, non_blocking=True)
                with autocast(device, cfg.train.dtype):
                    distill = None
                    if run.teachers:  # their output layers' input: the loss computes their logits by chunks
                        with torch.no_grad():
                            t_hidden = tuple(t.norm_f(t.hidden(x)) for t in run.teachers)
                        distill = DistillTarget(None, cfg.distill.alpha, cfg.distill.temperature, cfg.distill.mtp_inside,
                                                hidden=t_hidden, head=tuple(t.head_weight for t in run.teachers),
                                                softcap=tuple(t.cfg.logit_softcap for t in run.teachers))
                    _, loss = run.fwd_model(x, y, return_logits=False, loop_active=loop_active, distill=distill,
                                            depth_scales=depth_scales)
                if run.shard is not None and i == run.accum - 1:
                    run.shard.arm()  # the last backward: buckets are reduced as they finish
                (loss / run.accum).backward()
                loss_sum += loss.detach()
            for p in params:
                if p.grad is None:  # e.g. a block skipped by stochastic depth (the same on every rank)
                    p.grad = torch.zeros_like(p)
            timer.mark("fwd_bwd")
            max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
            if cfg.optim.clip_scope == "local" and math.isfinite(max_norm):
                torch.nn.utils.clip_grad_norm_(params, max_norm)  # this rank's gradient, before the average
                max_norm = math.inf  # the averaged one is only measured
            # a signal on any rank stops every rank after this same step
            stop = torch.tensor(0.0 if signals.signum is None else 1.0, device=device)
            if run.shard is not None:  # each gradient onto its owner rank
                run.shard.reduce_grads()
                distributed.all_reduce_mean([loss_sum, stop], env)
            else:
                distributed.all_reduce_mean([p.grad for p in params] + [loss_sum, stop], env)
            timer.mark("comm")
            train_loss = loss_sum.item() / run.accum
            if not math.isfinite(train_loss):
                where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
                log.line(f"stopping: loss is {train_loss} at step {run.step + 1}; {where}")
                raise TrainingError(f"loss became {train_loss} at step {run.step + 1} (lower optim lr or check the data); {where}")
            if run.shard is not None:
                gnorm = run.shard.clip_grad_norm(max_norm)
                opt.step()  # each rank's own tensors (the others have no gradient)
                run.shard.broadcast_params()
            else:
                gnorm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
                opt.step()
            opt.zero_grad()
            timer.mark("opt")
            parts = timer.finish()  # the device has finished the step: its time is read now
            run.step += 1
            step = run.step
            if run.shard is not None and env.distributed and step == first_step + 1:
                log.line(f"# {run.shard.describe()}")
            if ema is not None:
                ema.update(model, step)
            dt = time.time() - t0
            if step > 1 or total_steps == 1:  # the first step (allocation, compilation) is not representative
                steps_timed, time_in_steps = run.timed = steps_timed + 1, time_in_steps + dt
            tok_s = run.tokens_per_step * steps_timed / time_in_steps if steps_timed else run.tokens_per_step / dt
            if step % cfg.train.log_every == 0 or step == total_steps:
                eta = (total_steps - step) * (time_in_steps / steps_timed if steps_timed else dt)
                log.line(f"step {step:>6}/{total_steps} | epoch {loader.epochs_done:6.2f} | loss {train_loss:.4f} | "
                         f"lr {lr_mult:.3f} | gnorm {gnorm:.3f} | {tok_s:,.0f} tok/s | "
                         f"elapsed {fmt_time(run.elapsed_before_s + time.time() - t_loop)} | ETA {fmt_time(eta)}")
                log.metrics({"kind": "train", "step": step, "epoch": loader.epochs_done, "loss": train_loss,
                             "lr_mult": lr_mult, "wd_mult": wd_mult, "grad_norm": gnorm, "tokens_per_s": tok_s,
                             "step_s": dt, **{f"{k}_s": v for k, v in parts.items()},
                             "tokens": step * run.tokens_per_step})
            log.progress(step)

            cycle = sched.cycle_end(step - 1)
            if cycle is not None:
                if env.is_main:
                    save_weights(RunDir(run.run_dir).snapshot(cycle), model.state_dict(), cfg,
                                 {"dataset": run.ds.fingerprint, "step": step, "cycle": cycle})
                if cfg.train.snapshot_cycles and cfg.train.snapshot_noise > 0 and step < total_steps:
                    perturb(model, cfg.train.snapshot_noise, _step_seed(cfg.train.seed, 0, step))
            epoch_end = loader.epoch > epoch_before
            if cfg.train.epoch_snapshots and (epoch_end or step == total_steps) and env.is_main:
                save_epoch_snapshot(run, loader.epoch if epoch_end else math.ceil(loader.epochs_done))
            if epoch_end and cfg.eval.at_epoch_end and step < total_steps:
                eval_val(run, f"epoch {loader.epoch} end")
            elif cfg.eval.every_steps > 0 and step % cfg.eval.every_steps == 0 and step < total_steps:
                eval_val(run, "periodic")
            if stop.item() > 0 and step < total_steps:
                signum = signals.signum or signal.SIGTERM  # another rank may have got it
                write_checkpoint(run, run.elapsed_before_s + time.time() - t_loop)
                name = signal.Signals(signum).name
                log.line(f"stopping: {name} at step {step}/{total_steps}; checkpoint written")
                distributed.barrier(env)
                raise Interrupted(f"{name}: stopped at step {step}/{total_steps} after writing a checkpoint; "
                                  f"resume with: slowrun train --resume {run.run_dir}", 128 + signum)
            if step < total_steps and (epoch_end or (cfg.train.checkpoint_every > 0 and step % cfg.train.checkpoint_every == 0)):
                last_ckpt = write_checkpoint(run, run.elapsed_before_s + time.time() - t_loop)
    train_wall = run.elapsed_before_s + time.time() - t_loop
    write_checkpoint(run, train_wall)
    return FitStats(train_wall, steps_timed, time_in_steps)


# ---------------------------------------------------------------------------------------
# finish


def finish(run: Run, stats: FitStats, t_start: float) -> dict:
    """Save the final weights (rank 0), evaluate every variant (sharded over the ranks), write
    result.json (rank 0)."""
    cfg, env, ds, model, loader, log = run.cfg, run.env, run.ds, run.model, run.loader, run.log
    device = env.device
    ema = run.ema if run.ema is not None and run.ema.started else None  # an EMA that never started holds nothing
    # the network of the last step (also after a resume at the final evaluation, where no step ran)
    model.loop_active = _loop_active(cfg, max(0, math.ceil(loader.epochs_done) - 1))
    rd = RunDir(run.run_dir)
    if env.is_main:
        fp = {"dataset": ds.fingerprint, "step": run.step, "loop_active": model.loop_active}
        if cfg.train.save_final:
            save_weights(rd.weights("final"), model.state_dict(), cfg, fp)
        if ema is not None:
            save_weights(rd.weights("ema"), ema.state_dict(), cfg, fp)
    distributed.barrier(env)  # rank 0 has written the last SWA snapshot: every rank reads them
    result = final_evaluation(model, cfg, ds, run.run_dir, ema, log, env)
    if env.is_main:
        tokens_seen = run.step * run.tokens_per_step
        result.update({
            "run_dir": str(run.run_dir), "steps": run.step, "tokens_seen": tokens_seen, "unique_tokens": loader.num_tokens,
            "epochs": tokens_seen / loader.num_tokens, "wall_s": round(time.time() - t_start + run.elapsed_before_s, 2),
            "train_wall_s": round(stats.train_wall_s, 2),
            "tokens_per_s": round(run.tokens_per_step * stats.steps_timed / max(stats.time_in_steps_s, 1e-9), 1),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "peak_gpu_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None,
            "params": model.num_params(), "world_size": env.world_size,
            "flops_per_token": model.flops_per_token(_loop_active(cfg, loader.epoch)),
            "dataset": {"path": str(ds.path), **ds.fingerprint, "train": ds.manifest["files"].get("train.bin"),
                        "train_tokens": ds.num_tokens("train"),
                        "fitness_tokens": cfg.data.fitness_tokens},
            "seed": cfg.train.seed, "environment": run.env_info, "config": config_to_dict(cfg),
        })
        atomic_write_json(rd.result, result)
        log.line(result_table(result))
    distributed.barrier(env)
    return result if env.is_main else {}


@torch.no_grad()
def perturb(model: torch.nn.Module, scale: float, seed: int) -> None:
    """Snapshot ensembles: add N(0, (scale * rms(p))^2) noise to every matrix at a cycle start
    (the same noise on every rank)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.ndim >= 2:
            rms = p.float().pow(2).mean().sqrt()
            p.add_((torch.randn(p.shape, generator=g) * scale * rms).to(p.device, p.dtype))
