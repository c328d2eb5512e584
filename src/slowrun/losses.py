"""Training losses: the one function that composes the objective, a fused, chunked output
layer + softcap + cross-entropy, and distillation.

The output layer dominates small models with large vocabularies (on a 4-layer, 256-wide
model with 8k tokens, the logits' softcap, log-softmax and their backward took about 45%
of a CPU step when done as separate full-size passes). `linear_cross_entropy` computes the
loss and both gradients chunk by chunk in one sweep, so each (chunk, V) block is touched
while it is still in cache and the full (N, V) logits never exist. The elementwise part of a
chunk (softcap, softmax, their gradient) is a function of its own, built by inductor
(train.compile_loss) into a few loops instead of a dozen passes.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F


def _capped(z: torch.Tensor, softcap: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float32 softcap(z) of a chunk's raw logits z (a copy), and tanh(z / softcap) (None uncapped)."""
    z = z.to(torch.float32, copy=True)
    if softcap <= 0:
        return z, None
    t = torch.tanh(z.div_(softcap))
    return t * softcap, t


def _ce_rows(z: torch.Tensor, y: torch.Tensor, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The elementwise part of the fused output layer on a chunk of raw logits z (n, V): the summed
    CE of softcap(z) against y, and its gradient with respect to z, in z's dtype. In place where
    it can be, so that it runs fast eagerly too; inductor builds it as a few loops over the chunk
    (`_run_kernel`)."""
    zc, t = _capped(z, softcap)
    lse = torch.logsumexp(zc, dim=-1, keepdim=True)
    loss = (lse - zc.gather(1, y[:, None])).sum()
    g = torch.exp_(zc.sub_(lse))  # softmax, in place
    g[torch.arange(len(y), device=y.device), y] -= 1.0
    if t is not None:
        g.mul_(1.0 - t * t)
    return loss, g.to(z.dtype)


def _distill_rows(z: torch.Tensor, y: torch.Tensor, softcap: float, alpha: float, temperature: float,
                  t_softcaps: tuple[float, ...], *teacher_z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_ce_rows` for distillation: the chunk's summed CE and KL(teachers || student at T), and the
    gradient of (1-a) CE + a T^2 KL with respect to the student's raw logits z:
    (1-a) (softmax(zc) - onehot(y)) + a T (softmax(zc/T) - pt), times d softcap/dz, with pt the
    teachers' probabilities at T (of their capped raw logits teacher_z) averaged."""
    a, T = alpha, temperature
    rows = torch.arange(len(y), device=y.device)
    zc, t = _capped(z, softcap)
    pt = None
    for zt, cap in zip(teacher_z, t_softcaps):
        p_k = torch.softmax(_capped(zt, cap)[0].div_(T), dim=-1)
        pt = p_k if pt is None else pt.add_(p_k)
    if len(t_softcaps) > 1:
        pt.div_(len(t_softcaps))
    lse = torch.logsumexp(zc, dim=-1, keepdim=True)
    ce = (lse.squeeze(-1) - zc[rows, y]).sum()
    log_q = torch.log_softmax(zc / T, dim=-1)
    kl = (torch.xlogy(pt, pt) - pt * log_q).sum()  # xlogy: 0 log 0 = 0
    g = torch.exp_(zc.sub_(lse)).mul_(1 - a)  # (1-a) softmax(zc), in place
    g[rows, y] -= 1 - a
    g.add_(torch.exp_(log_q).sub_(pt), alpha=a * T)
    if t is not None:
        g.mul_(1.0 - t * t)
    return ce, kl, g.to(z.dtype)


# the elementwise kernels as inductor builds them (dynamic shapes: one build serves every chunk
# size and vocabulary), None after a build failed; and whether to build them (train.compile_loss)
_COMPILED: dict = {}
_COMPILE: dict = {"on": True, "warn": None}


def compile_kernels(on: bool, warn=None) -> None:
    """Whether the fused output layer runs its elementwise kernels compiled (train.compile_loss),
    and where a failed build is reported (a run's log; None: Python's warnings)."""
    _COMPILE.update(on=bool(on), warn=warn)


def _run_kernel(fn, *args):
    """fn(*args), compiled by inductor where it can be built: a (256, 8,192) chunk's CE and gradient
    took 30 ms eagerly on one CPU core and 6.3 ms compiled, and the CPU track's step 6-14% less time
    (distillation's 10-34%; benchmarks/results/loss_kernel.json).
    Inside a compiled model the model's own graph takes fn in; where inductor cannot build it (no C++
    compiler, say) it runs eagerly from then on, with one warning."""
    if not _COMPILE["on"] or torch.compiler.is_compiling():
        return fn(*args)
    compiled = _COMPILED.get(fn, False)
    if compiled is False:
        compiled = _COMPILED[fn] = torch.compile(fn, dynamic=True)
    if compiled is None:
        return fn(*args)
    try:
        return compiled(*args)
    except Exception as e:  # a failed build: the same math, eagerly (fn is pure, so nothing ran half)
        _COMPILED[fn] = None
        first = (str(e).strip().splitlines() or [""])[0][:200]
        msg = (f"the fused output layer's compiled kernel could not be built ({type(e).__name__}: {first}); "
               "it runs eagerly, slower (train.compile_loss=false skips the build)")
        _COMPILE["warn"](f"warning: {msg}") if _COMPILE["warn"] else warnings.warn(msg)
        return fn(*args)


def _chunk_backward(g: torch.Tensor, Wc: torch.Tensor, hc: torch.Tensor, grad_W: torch.Tensor) -> torch.Tensor:
    """From dLoss/dz of a chunk's raw logits z = hc @ Wc^T: its rows of dL/dh, returned, and its
    share of dL/dW, added to grad_W (both unscaled: the caller divides by the rows)."""
    grad_W += g.T @ hc
    return g @ Wc


class _LinearCrossEntropy(torch.autograd.Function):
    """mean_i CE(softcap(h_i W^T), y_i); gradients are computed in the forward pass."""

    @staticmethod
    def forward(ctx, h, W, targets, softcap: float, chunk: int, compute_dtype):
        N = h.size(0)
        hc_all = h.to(compute_dtype)
        Wc = W.to(compute_dtype)
        grad_h = torch.empty_like(hc_all)
        grad_W = torch.zeros(W.shape, dtype=torch.float32, device=W.device)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for i in range(0, N, chunk):
            hc, y = hc_all[i:i + chunk], targets[i:i + chunk]
            loss, g = _run_kernel(_ce_rows, hc @ Wc.T, y, softcap)
            total += loss
            grad_h[i:i + chunk] = _chunk_backward(g, Wc, hc, grad_W)
        ctx.save_for_backward(grad_h.to(h.dtype).div_(N), grad_W.div_(N).to(W.dtype))
        return total / N

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_W = ctx.saved_tensors
        return grad_h * grad_out, grad_W * grad_out, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, W: torch.Tensor, targets: torch.Tensor, softcap: float = -1.0,
                         chunk: int = 256) -> torch.Tensor:
    """Mean cross-entropy of softcap(h @ W^T) against targets; h (N, C), W (V, C), targets (N,).

    Under autocast the matmuls run in the autocast dtype and the softmax in float32, as
    the unfused path does.
    """
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    with torch.autocast(dev, enabled=False):
        return _LinearCrossEntropy.apply(h, W, targets, softcap, chunk, dtype)


class _LinearDistillation(torch.autograd.Function):
    """mean_i [(1-a) CE(z_i, y_i) + a T^2 KL(pt_i || softmax(z_i/T))] with z = softcap(h W^T)
    the student's logits and pt the teachers' probabilities at temperature T, averaged over the
    teachers (zt_k = softcap_k(ht_k Wt_k^T)); every logit computed a chunk of rows at a time;
    gradients (for h and W only) in the forward pass. The teachers' tensors come last, flat
    (ht_1, Wt_1, ht_2, Wt_2, ...), so that torch.compile sees only tensors and constants.

    d/dz of the row's loss: (1-a) (softmax(z) - onehot(y)) + a T (softmax(z/T) - pt).
    """

    @staticmethod
    def forward(ctx, h, W, targets, softcap: float, chunk: int, compute_dtype, alpha: float, temperature: float,
                t_softcaps: tuple[float, ...], *teachers):
        N = h.size(0)
        hc_all, Wc = h.to(compute_dtype), W.to(compute_dtype)
        tc = [t.to(compute_dtype) for t in teachers]
        grad_h = torch.empty_like(hc_all)
        grad_W = torch.zeros(W.shape, dtype=torch.float32, device=W.device)
        ce_total = torch.zeros((), dtype=torch.float32, device=h.device)
        kl_total = torch.zeros((), dtype=torch.float32, device=h.device)
        for i in range(0, N, chunk):
            hc, y = hc_all[i:i + chunk], targets[i:i + chunk]
            teacher_z = [tc[2 * k][i:i + chunk] @ tc[2 * k + 1].T for k in range(len(t_softcaps))]
            ce, kl, g = _run_kernel(_distill_rows, hc @ Wc.T, y, softcap, alpha, temperature, t_softcaps, *teacher_z)
            ce_total += ce
            kl_total += kl
            grad_h[i:i + chunk] = _chunk_backward(g, Wc, hc, grad_W)
        ctx.save_for_backward(grad_h.to(h.dtype).div_(N), grad_W.div_(N).to(W.dtype))
        return ((1 - alpha) * ce_total + alpha * temperature**2 * kl_total) / N

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_W = ctx.saved_tensors
        return grad_h * grad_out, grad_W * grad_out, *([None] * (len(ctx.needs_input_grad) - 2))


def linear_distillation(h: torch.Tensor, W: torch.Tensor, targets: torch.Tensor, softcap: float,
                        teacher_h, teacher_W, teacher_softcap, alpha: float, temperature: float,
                        chunk: int = 256) -> torch.Tensor:
    """(1-alpha) CE + alpha T^2 KL(teachers || student), each a mean over the N rows, of the
    student's softcap(h @ W^T) (h (N, C), W (V, C)) against targets (N,) and the teacher's
    softcap_t(teacher_h @ teacher_W^T) (teacher_h (N, Ct): its final hidden states after its
    output norm): `distill_loss` on logits that are never materialised whole. Several teachers
    (a tuple each of teacher_h, teacher_W, teacher_softcap): their probabilities at temperature T
    averaged, an ensemble's. Gradients flow to h and W only (the teachers are fixed). Under
    autocast the matmuls run in its dtype and the softmaxes in float32, as the unfused path does.
    """
    if isinstance(teacher_h, torch.Tensor):
        teacher_h, teacher_W, teacher_softcap = (teacher_h,), (teacher_W,), (teacher_softcap,)
    if not (len(teacher_h) == len(teacher_W) == len(teacher_softcap) >= 1):
        raise ValueError(f"linear_distillation: {len(teacher_h)} teacher hidden states, {len(teacher_W)} heads, "
                         f"{len(teacher_softcap)} softcaps")
    flat = [t.detach() for pair in zip(teacher_h, teacher_W) for t in pair]
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    with torch.autocast(dev, enabled=False):
        return _LinearDistillation.apply(h, W, targets, softcap, chunk, dtype, alpha, temperature,
                                         tuple(float(c) for c in teacher_softcap), *flat)


def distill_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                  temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE(student, y), KL(softmax(teacher/T) || softmax(student/T))), each a mean over tokens."""
    V = student_logits.size(-1)
    s = student_logits.float().reshape(-1, V)
    ce = F.cross_entropy(s, targets.reshape(-1))
    t_logp = torch.log_softmax(teacher_logits.float().reshape(-1, V) / temperature, dim=-1)
    s_logp = torch.log_softmax(s / temperature, dim=-1)
    kl = F.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean")
    return ce, kl


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                 alpha: float, temperature: float) -> torch.Tensor:
    """(1-alpha)*CE(student, y) + alpha*T^2*KL(softmax(teacher/T) || softmax(student/T)), mean over tokens."""
    ce, kl = distill_terms(student_logits, teacher_logits, targets, temperature)
    return (1 - alpha) * ce + alpha * temperature**2 * kl


class DistillTarget(NamedTuple):
    """What the teachers contribute to a student's loss: a teacher's logits, or (as the trainer
    passes them) each teacher's output-layer input and weights, so that the fused loss computes
    their logits a chunk at a time beside the student's (`linear_distillation`). Several
    teachers are an ensemble: their probabilities at the temperature averaged."""

    logits: torch.Tensor | None  # (B, T, V) a teacher's logits, or None with `hidden`
    alpha: float  # weight of the KL term
    temperature: float
    mtp_inside: bool = False  # distill.mtp_inside: the MTP term inside the (1-alpha) side
    hidden: tuple[torch.Tensor, ...] = ()  # each teacher's final hidden states (B, T, Ct) after its output norm
    head: tuple[torch.Tensor, ...] = ()  # each teacher's output weights (V, Ct)
    softcap: tuple[float, ...] = ()  # each teacher's logit softcap

    def teacher_logits(self) -> torch.Tensor:
        """Logits whose softmax at the temperature is the teachers' average probability there:
        T log(mean_k softmax(z_k / T)) (a single teacher's own logits)."""
        if self.logits is not None:
            return self.logits
        zs = []
        for hidden, head, cap in zip(self.hidden, self.head, self.softcap):
            z = F.linear(hidden, head).float()
            zs.append(cap * torch.tanh(z / cap) if cap > 0 else z)
        if len(zs) == 1:
            return zs[0]
        T = self.temperature
        avg = torch.stack([torch.softmax(z / T, dim=-1) for z in zs]).mean(0)
        return T * torch.log(avg)


# tokens per chunk of the fused output layer: on CPU a (256, V) block stays in cache; on a GPU
# larger blocks keep the matmuls efficient while a (4096, 50257) float32 block is 0.8 GB,
# against 13 GB for the whole logits and their gradient at 32k tokens per micro-batch
FUSED_CHUNK = {"cpu": 256, "cuda": 4096}


def hidden_cross_entropy(model, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean CE of the model's output layer on hidden states h (B, T, C) against targets (B, T),
    through the fused, chunked output layer on every device: the (B, T, V) logits are never
    materialised whole. Under torch.compile it is traced into the model's graph (its loop over
    chunks unrolled: 2 chunks for the reference tracks' 8,192-token micro-batches on a GPU)."""
    C = h.size(-1)
    return linear_cross_entropy(model.norm_f(h).reshape(-1, C), model.head_weight, targets.reshape(-1),
                                model.cfg.logit_softcap, FUSED_CHUNK.get(h.device.type, 4096))


def training_loss(model, h: torch.Tensor, idx: torch.Tensor, targets: torch.Tensor, fused: bool,
                  distill: DistillTarget | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The objective, composed in one place; returns (logits or None, mean loss).

        MTP  = CE(MTP head at t, y_{t+1}) (predicts token t+2)   in training with an MTP head, else 0
        loss = CE(student, y) + mtp_weight MTP                   fused (no logits) when `fused`
             | (1-alpha) CE + alpha T^2 KL(teacher || student) + mtp_weight MTP
                                                                 with a teacher (distill.mtp_inside false)
             | (1-alpha) (CE + mtp_weight MTP) + alpha T^2 KL    with a teacher and distill.mtp_inside
                                                                 (the reference's)

    Evaluation (model.eval()) never includes the MTP term. The MTP head reads the targets
    (model.mtp_style = reference: the true next token's embedding).
    """
    ce = kl = None
    if distill is not None and fused and distill.hidden:
        C = h.size(-1)
        logits, loss = None, linear_distillation(
            model.norm_f(h).reshape(-1, C), model.head_weight, targets.reshape(-1), model.cfg.logit_softcap,
            tuple(t.reshape(-1, t.size(-1)) for t in distill.hidden), distill.head, distill.softcap,
            distill.alpha, distill.temperature, FUSED_CHUNK.get(h.device.type, 4096))
    elif distill is not None:
        logits = model.logits(h)
        ce, kl = distill_terms(logits, distill.teacher_logits(), targets, distill.temperature)
    elif fused:
        logits, loss = None, hidden_cross_entropy(model, h, targets)
    else:
        logits = model.logits(h)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
    mtp = None
    if model.mtp_block is not None and model.training and idx.size(1) > 1:
        mtp = model.cfg.mtp_weight * hidden_cross_entropy(model, model.mtp_hidden(h, idx, targets), targets[:, 1:])
    if distill is not None:
        a, T = distill.alpha, distill.temperature
        if ce is not None:
            loss = (1 - a) * ce + a * T**2 * kl  # as distill_loss; fused: already so
        if distill.mtp_inside and mtp is not None:
            return logits, loss + (1 - a) * mtp  # (1-a) (CE + MTP) + a T^2 KL
    if mtp is not None:
        loss = loss + mtp
    return logits, loss
