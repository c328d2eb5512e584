"""Optimizers: AdamW and Muon, standalone, with explicit parameter groups.

Parameter groups are assigned by the name patterns each technique declares in `techniques`
(`group_of`): embeddings, the output head, scalars/gates/norms, IHA's head-mixing tensors, and
2-D hidden matrices; a parameter no declaration claims is an error naming it, and an assertion
checks that every parameter lands in exactly one group. With `optim.name = "muon"` the hidden matrices use Muon
and everything else AdamW; with `adamw`, AdamW throughout. The reference benchmark's choices
are flags: the gate matrices in Muon (`optim.gates_in_muon`, the gates' `muon_when`), the residual
lambdas and U-Net weights at a fraction of the scalar rate (`optim.resid_lr_frac`), the x0 lambdas with their
own beta1 (`optim.x0_beta1`), the head gates and the XSA scales with their own betas
(`optim.head_gate_betas`, `optim.xsa_betas`), each in an AdamW group of its own
(`scalar_part_rules`, the parts the declarations name). `optim.matrix_optimizer` swaps
Muon for an optimizer that preconditions both sides of each matrix, from heavyball (SOAP,
KL-Shampoo, PSGD-Kron; the `second-order` extra), run eagerly (no torch.compile) so it
works on CPU; its nested state goes through checkpoints as flat tensors plus JSON.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .config import OptimConfig
from .distributed import fast_bf16_available
from .techniques import GROUPS as GROUP_KINDS
from .techniques import TechniqueError, claim

if TYPE_CHECKING:
    from .gpt import GPT

QUINTIC = (3.4445, -4.7750, 2.0315)
POLAR_EXPRESS = (  # Amsel et al. 2025, per-step coefficients, used after dividing by 1.02 x ||X||_F
    (8.157, -22.483, 15.879),
    (4.043, -2.809, 0.500),
    (3.892, -2.772, 0.506),
    (3.286, -2.368, 0.464),
    (2.347, -1.710, 0.423),
)
POLAR_EXPRESS_EXACT = (  # the same at full precision (nanochat's and the reference's), with eps 1e-6
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
HEAVYBALL = {"soap": "SOAP", "kl_shampoo": "KLShampoo", "psgd_kron": "PSGDKron"}  # optim.matrix_optimizer -> class
# heavyball keeps counters in its param groups; these are restored on resume, every other
# group setting comes from this run's config
# Muon steps a group's matrices of one shape as stacks of at most this many elements: the
# transient copies of a stack (its update, Newton-Schulz iterates, decay terms) stay bounded,
# and a matrix this large fills the device on its own, so batching it would gain nothing
MAX_STACK_ELEMENTS = 1 << 24
HEAVYBALL_GROUP_STATE = ("step", "step_count", "is_preconditioning", "prev_lr", "param_count", "is_cached")


def group_of(name: str, p: Tensor, gates_in_muon: str = "none") -> str:
    """Which parameter group a named parameter belongs to: the one its declaration in `techniques`
    gives (`techniques.claim`: an error naming a parameter that no technique claims). A gate matrix
    is a scalar unless `gates_in_muon` (optim.gates_in_muon) is among its `muon_when`."""
    decl = claim(name)
    group = "matrix" if gates_in_muon in decl.muon_when else decl.group
    if group == "matrix" and p.ndim != 2:
        raise TechniqueError(f"parameter {name}: declared a matrix in slowrun/techniques.py, but has shape {tuple(p.shape)}")
    return group


def muon_chunks(name: str, swiglu_parts: bool = False) -> int:
    """Parts a fused matrix is orthogonalized in, each with its own shape scale: q/k/v of
    c_attn always; the SwiGLU input [gate; up] (mlp.c_fc) only with `swiglu_parts`
    (optim.muon_swiglu_parts, the reference's separate matrices), else as one matrix."""
    if name.endswith("attn.c_attn.weight"):
        return 3
    if swiglu_parts and name.endswith("mlp.c_fc.weight"):
        return 2
    return 1


# ---------------------------------------------------------------------------------------
# Newton-Schulz orthogonalization


def orthogonalize(G: Tensor, steps: int = 5, coeffs: str = "quintic", eps: float = 1e-7,
                  dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Approximate U V^T of G = U S V^T (batched over leading dims) by a quintic polynomial
    iteration X <- aX + (bA + cA^2)X, A = X X^T, on the wide orientation.

    `quintic` repeats (3.4445, -4.7750, 2.0315) after scaling to Frobenius norm <= 1 (the
    singular values end in roughly [0.7, 1.2]); `polar_express` uses per-step coefficients
    after dividing by 1.02 x the Frobenius norm; `polar_express_exact` the same at full
    precision, dividing by 1.02 x the norm + 1e-6 (nanochat's and the reference's).
    """
    X = G.to(dtype)
    if X.ndim > 3:
        return orthogonalize(G.flatten(0, -3), steps, coeffs, eps, dtype).view(G.shape)
    transposed = G.size(-2) > G.size(-1)
    if transposed:
        X = X.mT
    norm = X.norm(dim=(-2, -1), keepdim=True)
    if coeffs == "quintic":
        X = X / norm.clamp(min=eps)
        schedule = [QUINTIC] * steps
    else:
        table = POLAR_EXPRESS_EXACT if coeffs == "polar_express_exact" else POLAR_EXPRESS
        X = X / (norm * 1.02 + (1e-6 if coeffs == "polar_express_exact" else eps))
        schedule = [table[min(i, len(table) - 1)] for i in range(steps)]
    mm = torch.addmm if X.ndim == 2 else torch.baddbmm
    for a, b, c in schedule:
        A = X @ X.mT
        B = mm(A, A, A, beta=b, alpha=c)  # bA + cA^2
        X = mm(X, B, X, beta=a)  # aX + BX
    if transposed:
        X = X.mT
    return X.to(G.dtype)


# ---------------------------------------------------------------------------------------


class AdamW(torch.optim.Optimizer):
    """Decoupled-weight-decay Adam (Loshchilov & Hutter), numerically as torch.optim.AdamW,
    plus optional cautious weight decay (decay only where update and parameter agree in sign).
    Each group is stepped with torch's foreach ops (a few kernels for all its tensors); the
    state stays per tensor, as torch's."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, cautious_wd: bool = False) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, cautious_wd=cautious_wd))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in params:
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["step"] += 1  # per tensor: a tensor without a gradient (sharded, unused) keeps its count
            grads = [p.grad for p in params]
            m = [self.state[p]["exp_avg"] for p in params]
            v = [self.state[p]["exp_avg_sq"] for p in params]
            t = [self.state[p]["step"] for p in params]
            torch._foreach_lerp_(m, grads, 1 - b1)
            torch._foreach_mul_(v, b2)
            torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, [math.sqrt(1 - b2**s) for s in t])
            torch._foreach_add_(denom, eps)
            update = torch._foreach_div(m, denom)
            torch._foreach_div_(update, [1 - b1**s for s in t])
            if wd != 0:
                if group["cautious_wd"]:
                    agree = torch._foreach_mul(update, params)
                    torch._foreach_sign_(agree)
                    torch._foreach_clamp_min_(agree, 0.0)  # 1 where update and parameter agree in sign, else 0
                    torch._foreach_mul_(agree, params)
                    torch._foreach_sub_(params, agree, alpha=lr * wd)
                else:
                    torch._foreach_mul_(params, 1 - lr * wd)
            torch._foreach_add_(params, update, alpha=-lr)


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz, for 2-D hidden matrices.

    Per step: buf <- lerp(buf, g, 1-momentum); u = lerp(g, buf, momentum) (Nesterov);
    optionally MuonEq-R (rows of u normalized); O = orthogonalize(u); optionally NorMuon
    (O divided by the root of a running mean square, overall norm kept);
    p <- p * (1 - lr*wd) - lr * sqrt(max(1, rows/cols)) * O.

    A group's `chunks` splits a fused matrix into that many row blocks, each orthogonalized,
    normalized and shape-scaled as a matrix of its own. NorMuon's statistics are per row
    (`normuon_wide="row"`, the norm kept over the whole parameter), or as the reference
    (`"column"`): per column for a wide part (rows < cols), per row otherwise, divided by
    sqrt(max(v, 1e-10)) and the Frobenius norm of each part kept. `scaled_wd` is the reference's
    decay: cautious (only where O*p >= 0) at the shape-scaled rate,
    p <- p - lr_t*O - lr_t*wd*p*mask with lr_t = lr * sqrt(max(1, rows/cols)).

    A group's matrices of one shape are stepped as one stack (up to MAX_STACK_ELEMENTS): one
    batched orthogonalization per shape, not one per matrix. The state stays per parameter (its
    momentum buffer and NorMuon statistics), so checkpoints keep their layout.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5, coeffs: str = "quintic", eq_r: bool = False,
                 normuon: bool = False, normuon_beta2: float = 0.95, normuon_wide: str = "row",
                 cautious_wd: bool = False, scaled_wd: bool = False,
                 ns_dtype: torch.dtype = torch.bfloat16, eps: float = 1e-7) -> None:
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_steps=ns_steps,
                        coeffs=coeffs, eq_r=eq_r, normuon=normuon, normuon_beta2=normuon_beta2,
                        normuon_wide=normuon_wide, cautious_wd=cautious_wd, scaled_wd=scaled_wd,
                        ns_dtype=ns_dtype, eps=eps, chunks=1)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2-D matrices only, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        for group in self.param_groups:
            # matrices of one shape are stepped together: one batched orthogonalization per stack
            by_shape: dict[tuple, list[Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault((p.shape, p.dtype), []).append(p)
            for params in by_shape.values():
                n = max(1, MAX_STACK_ELEMENTS // params[0].numel())
                for i in range(0, len(params), n):
                    self._step_stack(group, params[i:i + n])

    def _step_stack(self, group: dict, params: list[Tensor]) -> None:
        """One step of the matrices `params`, all of one shape, as a stack (n, rows, cols); the
        state stays per parameter (its own tensors, as checkpoints store them)."""
        lr, mom, wd, eps = group["lr"], group["momentum"], group["weight_decay"], group["eps"]
        states = [self.state[p] for p in params]
        for p, st in zip(params, states):
            if not st:
                st["momentum_buffer"] = torch.zeros_like(p)
        grads = [p.grad for p in params]
        bufs = [st["momentum_buffer"] for st in states]
        torch._foreach_lerp_(bufs, grads, 1 - mom)
        u = torch.stack(torch._foreach_lerp(grads, bufs, mom) if group["nesterov"] else bufs)  # (n, rows, cols)
        n, rows, cols = u.shape
        k = group["chunks"] if rows % group["chunks"] == 0 else 1
        u = u.view(n * k, rows // k, cols)  # fused matrices: orthogonalize each part
        if group["eq_r"]:
            u = u / u.norm(dim=-1, keepdim=True).clamp(min=eps)
        O = orthogonalize(u, group["ns_steps"], group["coeffs"], eps, group["ns_dtype"]).reshape(n, k, rows // k, cols)
        if group["normuon"] and group["normuon_wide"] == "column":
            O = _normuon_by_shape(O, states, group["normuon_beta2"])
        elif group["normuon"]:
            v = _running_mean_square(states, "row_sq", O.float().square().mean(-1, keepdim=True), group["normuon_beta2"])
            norm = lambda x: torch.linalg.vector_norm(x, dim=(1, 2, 3), keepdim=True)  # each matrix's, over its parts
            n0 = norm(O)
            O = O / (v.sqrt() + eps).to(O.dtype)
            O = O * (n0 / norm(O).clamp(min=eps))
        O = O.reshape(n, rows, cols)
        scale = math.sqrt(max(1.0, (rows / k) / cols))
        if group["scaled_wd"]:
            lr_t = lr * scale
            P = torch.stack(params)
            mask = (O * P >= 0) if group["cautious_wd"] else 1.0
            torch._foreach_sub_(params, list((O * lr_t + P * mask * (lr_t * wd)).unbind(0)))
            return
        if wd != 0:
            if group["cautious_wd"]:
                P = torch.stack(params)
                torch._foreach_sub_(params, list((P * (O * P > 0)).unbind(0)), alpha=lr * wd)
            else:
                torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_add_(params, list(O.unbind(0)), alpha=-lr * scale)


def _running_mean_square(states: list[dict], key: str, sq: Tensor, beta2: float) -> Tensor:
    """NorMuon's running mean square: each matrix's own state tensor `key` (zeros at first)
    moved toward its slice of `sq` (n, ...), returned stacked as `sq`."""
    for st, s in zip(states, sq):
        if key not in st:
            st[key] = torch.zeros_like(s)
    v = [st[key] for st in states]
    torch._foreach_lerp_(v, list(sq.unbind(0)), 1 - beta2)
    return torch.stack(v)


def _normuon_by_shape(O: Tensor, states: list[dict], beta2: float) -> Tensor:
    """The reference's NorMuon on the parts O (n, k, rows, cols) of n matrices: a running mean
    square per row (rows >= cols) or per column (wide), O divided by its root, each part's norm kept."""
    red = -1 if O.size(-2) >= O.size(-1) else -2
    Of = O.float()
    v = _running_mean_square(states, "row_sq" if red == -1 else "col_sq", Of.square().mean(red, keepdim=True), beta2)
    scaled = Of * v.clamp_min(1e-10).rsqrt()
    n0, n1 = Of.norm(dim=(-2, -1), keepdim=True), scaled.norm(dim=(-2, -1), keepdim=True)
    return (scaled * (n0 / n1.clamp_min(1e-10))).to(O.dtype)


# ---------------------------------------------------------------------------------------


@dataclass
class Optimizers:
    """The run's optimizers, driven together; each group remembers its kind and peak lr/wd."""

    optimizers: list[torch.optim.Optimizer]

    def groups(self):
        for opt in self.optimizers:
            yield from opt.param_groups

    def set_schedule(self, lr_mult: float, wd_mult: float, momentum: float | None = None) -> None:
        for g in self.groups():
            g["lr"] = g["base_lr"] * lr_mult
            g["weight_decay"] = g["base_wd"] * wd_mult
            if momentum is not None and "momentum" in g:
                g["momentum"] = momentum

    def step(self) -> None:
        for opt in self.optimizers:
            if is_heavyball(opt):
                heavyball_step(opt)
            else:
                opt.step()

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def state_dict(self) -> list[dict]:
        return [heavyball_state(opt) if is_heavyball(opt) else opt.state_dict() for opt in self.optimizers]

    def load_state_dict(self, states: list[dict]) -> None:
        """Per-parameter states (as saved); the groups' settings come from this run's config."""
        if len(states) != len(self.optimizers):
            raise ValueError(f"checkpoint has {len(states)} optimizer states, this run has {len(self.optimizers)}")
        for opt, st in zip(self.optimizers, states):
            st = st.get("state", st) if "param_groups" in st else st
            if is_heavyball(opt):
                load_heavyball_state(opt, st)
            else:
                opt.load_state_dict({"state": st, "param_groups": opt.state_dict()["param_groups"]})


# ---------------------------------------------------------------------------------------
# heavyball (optional): SOAP, KL-Shampoo, PSGD-Kron for the hidden matrices


def is_heavyball(opt: torch.optim.Optimizer) -> bool:
    return type(opt).__module__.split(".")[0] == "heavyball"


def heavyball_optimizer(name: str, groups: list[dict], precondition_frequency: int) -> torch.optim.Optimizer:
    """heavyball's optimizer `name` (a key of HEAVYBALL) over `groups`, run eagerly; its other
    hyperparameters (betas, eps, shampoo_beta, ...) are heavyball's defaults."""
    from .config import ConfigError

    try:
        import heavyball
        import heavyball.utils
    except ImportError:
        raise ConfigError(f"optim.matrix_optimizer={name} needs heavyball: pip install 'slowrun[second-order]'") from None
    heavyball.utils.compile_mode = None  # eager: no compiler needed (CPU), same numbers on every rank
    kw = {} if name == "psgd_kron" else {"precondition_frequency": precondition_frequency}
    return getattr(heavyball, HEAVYBALL[name])(groups, **kw)


def heavyball_step(opt: torch.optim.Optimizer) -> None:
    """One step with the random draws (PSGD-Kron's probe vectors) seeded by heavyball's own
    step counter: the same on every rank (the trainer seeds each rank apart), the same after
    a resume, and the training's random stream left untouched."""
    n = opt.param_groups[0].get("step_count", 0)
    dev = opt.param_groups[0]["params"][0].device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), warnings.catch_warnings():
        # the schedules change the learning rate every step, by design: heavyball's notice of it is noise
        warnings.filterwarnings("ignore", message="Learning rate changed between steps")
        torch.manual_seed(1_000_003 + int(n))
        opt.step()


def _encode(v, tensors: dict[str, Tensor]):
    """A nested state as JSON with its tensors moved to `tensors` (by name)."""
    if isinstance(v, Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = v.detach().clone()  # no storage shared between entries (safetensors refuses it)
        return {"__t__": name}
    if isinstance(v, dict):
        return {"__d__": [[_encode(k, tensors), _encode(x, tensors)] for k, x in v.items()]}
    if isinstance(v, (list, tuple)):
        items = [_encode(x, tensors) for x in v]
        return items if isinstance(v, list) else {"__tuple__": items}
    if isinstance(v, (set, frozenset)):
        return {"__set__": sorted(v, key=repr)}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"heavyball state: cannot store a {type(v).__name__}")


def _decode(v, tensors: dict[str, Tensor]):
    if isinstance(v, list):
        return [_decode(x, tensors) for x in v]
    if isinstance(v, dict):
        if "__t__" in v:
            return tensors[v["__t__"]]
        if "__d__" in v:
            return {_decode(k, tensors): _decode(x, tensors) for k, x in v["__d__"]}
        if "__tuple__" in v:
            return tuple(_decode(x, tensors) for x in v["__tuple__"])
        if "__set__" in v:
            return set(v["__set__"])
    return v


def heavyball_state(opt: torch.optim.Optimizer) -> dict:
    """heavyball's state_dict as {"state": {pid: {"tree": JSON, "t0": tensor, ...}}}, the form
    checkpoints store; pid -1 holds the groups' counters and heavyball's own scalars (its
    pickled schedule is left out: it is rebuilt from the config, and nothing is unpickled)."""
    sd = opt.state_dict()
    out = {}
    for pid, st in sd["state"].items():
        tensors: dict[str, Tensor] = {}
        out[pid] = {"tree": json.dumps(_encode(st, tensors)), **tensors}
    tensors = {}
    extra = {"groups": [{k: g[k] for k in HEAVYBALL_GROUP_STATE if k in g} for g in sd["param_groups"]],
             "heavyball": {k: v for k, v in sd.get("heavyball", {}).items() if not isinstance(v, bytes)}}
    out[-1] = {"tree": json.dumps(_encode(extra, tensors)), **tensors}
    return {"state": out, "param_groups": sd["param_groups"]}


def load_heavyball_state(opt: torch.optim.Optimizer, state: dict) -> None:
    sd = opt.state_dict()  # this run's groups and heavyball's own fresh scalars
    st = {}
    for pid, flat in state.items():
        decoded = _decode(json.loads(flat["tree"]), {k: v for k, v in flat.items() if k != "tree"})
        if int(pid) == -1:
            for g, saved in zip(sd["param_groups"], decoded["groups"]):
                g.update(saved)
            sd.setdefault("heavyball", {}).update(decoded["heavyball"])
        else:
            st[int(pid)] = decoded
    sd["state"] = st
    opt.load_state_dict(sd)
    # torch's load casts floating state to the parameter's dtype (PSGD-Kron keeps float64
    # bounds): put back the tensors exactly as saved, only moved to the parameter's device
    params = [p for g in opt.param_groups for p in g["params"]]
    for pid, pstate in st.items():
        dev, tensors = params[pid].device, {}
        tree = _encode(pstate, tensors)
        opt.state[params[pid]] = _decode(tree, {k: v.to(dev) for k, v in tensors.items()})


def split_params(model: torch.nn.Module, gates_in_muon: str = "none") -> dict[str, list[tuple[str, Tensor]]]:
    """Parameters by group kind; asserts that every parameter is in exactly one group."""
    groups: dict[str, list[tuple[str, Tensor]]] = {k: [] for k in GROUP_KINDS}
    for name, p in model.named_parameters():
        groups[group_of(name, p, gates_in_muon)].append((name, p))
    seen = [id(p) for plist in groups.values() for _, p in plist]
    assert len(seen) == len(set(seen)) == len(list(model.parameters())), "a parameter is in no group or in two"
    return groups


def scalar_part_rules(cfg: OptimConfig) -> dict[str, tuple[float, tuple[float, float] | None]]:
    """The parts split off the scalar group into AdamW groups of their own (the reference's),
    each only when its flag is set, so that by default the scalars stay one "scalar" group
    (and checkpoints keep their layout): part -> (learning rate as a fraction of the scalar
    rate, AdamW betas or None for optim.beta1, beta2). Which parameters a part holds, the
    declarations in `techniques` say (`Params.part`)."""
    rules: dict[str, tuple[float, tuple[float, float] | None]] = {}
    if cfg.resid_lr_frac != 1.0:
        rules["resid"] = (cfg.resid_lr_frac, None)
    if cfg.x0_beta1 != -1:
        rules["x0"] = (1.0, (cfg.x0_beta1, cfg.beta2))
    if cfg.head_gate_betas:
        rules["head_gate"] = (1.0, (float(cfg.head_gate_betas[0]), float(cfg.head_gate_betas[1])))
    if cfg.xsa_betas:
        rules["xsa"] = (1.0, (float(cfg.xsa_betas[0]), float(cfg.xsa_betas[1])))
    return rules


def scalar_parts(plist: list[tuple[str, Tensor]], cfg: OptimConfig) -> dict[str, list[Tensor]]:
    """The scalar group split by `scalar_part_rules`, order kept: "scalar" holds the rest (with
    no rule set, every scalar as before)."""
    rules = scalar_part_rules(cfg)
    parts: dict[str, list[Tensor]] = {"scalar": [], **{k: [] for k in rules}}
    for name, p in plist:
        part = claim(name).part
        parts[part if part in rules else "scalar"].append(p)
    return {k: v for k, v in parts.items() if v}


def store_bf16(model: GPT, cfg: OptimConfig) -> list[str]:
    """Cast the parameters of the groups in optim.bf16_params to bf16 in place (before the
    optimizers are built, so their state is bf16 too); returns their names."""
    names = []
    for name, p in model.named_parameters():
        if group_of(name, p, cfg.gates_in_muon if cfg.name == "muon" else "none") in cfg.bf16_params:
            p.data = p.data.to(torch.bfloat16)
            names.append(name)
    return names


def build_optimizers(model: GPT, cfg: OptimConfig, device: torch.device | None = None) -> Optimizers:
    groups = split_params(model, cfg.gates_in_muon if cfg.name == "muon" else "none")
    swiglu_parts = cfg.muon_swiglu_parts and model.cfg.mlp == "swiglu"
    width = model.cfg.n_embd  # the GPT's width, for the width scaling of AdamW rates
    adam_groups, muon_groups, precond_groups = [], [], []
    for kind, plist in groups.items():
        if not plist:
            continue
        wd = 0.0 if kind in ("scalar", "iha") else cfg.weight_decay if (kind == "matrix" or cfg.wd_embed) else 0.0
        lr = cfg.group_lr(kind, width)
        if kind == "matrix" and cfg.name == "muon" and cfg.matrix_optimizer != "muon":
            lr = cfg.precond_lr * cfg.lr_scale
            precond_groups.append(dict(params=[p for _, p in plist], kind=kind, base_lr=lr, base_wd=wd, lr=lr, weight_decay=wd))
        elif kind == "matrix" and cfg.name == "muon":
            # fused matrices get their own groups so they are orthogonalized part by part
            by_chunks: dict[int, list[Tensor]] = {}
            for name, p in plist:
                by_chunks.setdefault(muon_chunks(name, swiglu_parts), []).append(p)
            for chunks, params in sorted(by_chunks.items()):
                muon_groups.append(dict(params=params, kind=kind, base_lr=lr, base_wd=wd, lr=lr, weight_decay=wd, chunks=chunks))
        elif kind == "scalar":
            rules = scalar_part_rules(cfg)
            for part, params in scalar_parts(plist, cfg).items():
                frac, betas = rules.get(part, (1.0, None))
                plr = lr * frac
                extra = dict(betas=betas) if betas is not None else {}
                adam_groups.append(dict(params=params, kind=part, base_lr=plr, base_wd=wd, lr=plr, weight_decay=wd, **extra))
        else:
            adam_groups.append(dict(params=[p for _, p in plist], kind=kind, base_lr=lr, base_wd=wd, lr=lr, weight_decay=wd))
    opts: list[torch.optim.Optimizer] = []
    muon_only = cfg.cautious_wd_scope == "muon"  # the reference: cautious decay in Muon only, at Muon's scaled rate
    if adam_groups:
        opts.append(AdamW(adam_groups, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, cautious_wd=cfg.cautious_wd and not muon_only))
    if muon_groups:
        ns_dtype = torch.bfloat16 if fast_bf16_available(device or torch.device("cpu")) else torch.float32
        opts.append(Muon(muon_groups, momentum=cfg.muon_momentum_start, ns_steps=cfg.muon_ns_steps, coeffs=cfg.muon_coeffs,
                         eq_r=cfg.muon_eq_r, normuon=cfg.normuon, normuon_wide=cfg.normuon_wide,
                         cautious_wd=cfg.cautious_wd, scaled_wd=cfg.cautious_wd and muon_only, ns_dtype=ns_dtype))
    if precond_groups:
        opts.append(heavyball_optimizer(cfg.matrix_optimizer, precond_groups, cfg.precondition_frequency))
    return Optimizers(opts)
