"""The optimizer: AdamW, or Muon for the blocks' weight matrices with AdamW for the rest, either
one optionally inside timm's Lookahead.

Muon (Jordan et al. 2024; `torch.optim.Muon`, here with its Newton-Schulz step in float32 on a
CPU: `Muon`) orthogonalizes each 2-D weight's momentum with a few
Newton-Schulz steps, so every direction of the matrix moves at the same rate. It is meant for the
hidden layers' matrices only: the patch kernel (4-D), biases, norms, positions, tokens and the
classifier head stay with AdamW.

Lightning's automatic optimization steps one optimizer, so `MuonAdamW` is one `Optimizer` over
the two: one closure call (one forward and backward) per step, then both update. Its
`param_groups` are the two optimizers' own group dicts, so the learning-rate schedule
(`ViTClassifier._follow_schedules`), gradient clipping and Lightning's LearningRateMonitor see
every group, each with its own `peak_lr`.

Lookahead (Zhang et al. 2019; `timm.optim.Lookahead`, as airbench uses it): every `k` steps the
slow weights move `lookahead_alpha` of the way to the optimizer's (fast) weights, and the fast
weights restart from them (the slow weights start as the weights of the first sync). alpha 1
leaves the optimizer as it is; the schedule (`vit.schedule.lookahead_alpha`, set each step by
`ViTClassifier._follow_schedules`) lowers it along the run, so late in the run each restart is an
average of the recent weights (airbench: 1 - 0.95^5 x fraction^3, down to 0.23 at the end).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from timm.optim import Lookahead
from torch import nn


def newton_schulz(
    g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float, dtype: torch.dtype
) -> torch.Tensor:
    """The orthogonalized (2-D) update: torch.optim.Muon's quintic Newton-Schulz iteration, the
    same operations in `dtype` (torch's is fixed to bfloat16)."""
    a, b, c = coefficients
    x = g.to(dtype, copy=True)  # never in place on the caller's tensor (the momentum buffer)
    tall = g.size(0) > g.size(1)
    if tall:  # iterate on the wide orientation: the Gram matrix is the smaller one
        x = x.T
    x.div_(x.norm().clamp(min=eps))  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # a x + (b G + c G^2) x
    return x.T if tall else x


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's per-matrix learning rate for an (A, B) weight."""
    A, B = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, A / B))  # Keller Jordan's: taller matrices move further
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(A, B))  # Moonshot's: the update's RMS of AdamW's
    if adjust_lr_fn == "spectral_unclamped":
        return lr * math.sqrt(A / B)
    return lr


class Muon(torch.optim.Muon):
    """torch.optim.Muon, with the Newton-Schulz iteration in `ns_dtype`.

    torch's runs it in bfloat16, which is fast on GPUs and on CPUs with bfloat16 instructions but
    emulated elsewhere: on the 2 AVX2 cores here float32 took 2,283 steps in a 5-minute cpu_30min
    run where bfloat16 took 2,243 (AdamW alone: 2,859; the iteration itself is ~24% of a 16 px
    step's FLOPs at this model size, counted from the matrix shapes). `ns_dtype=None` picks bfloat16 on CUDA and float32 elsewhere. Same groups, hyperparameters and state (`momentum_buffer`) as torch's; with
    `ns_dtype=torch.bfloat16` the same update bit for bit (tested).
    """

    def __init__(self, params: Any, ns_dtype: torch.dtype | None = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, decay, momentum = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad, state = p.grad, self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(grad, 1 - momentum)  # buf = momentum * buf + (1 - momentum) * grad
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                dtype = self.ns_dtype or (torch.bfloat16 if p.device.type == "cuda" else torch.float32)
                update = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"], dtype)
                p.mul_(1 - lr * decay)  # decoupled weight decay
                p.add_(update, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss


def uses_muon(name: str, p: nn.Parameter) -> bool:
    """The transformer blocks' weight matrices (qkv, proj, fc1, fc2): Muon's 2-D hidden weights."""
    return name.startswith("blocks.") and p.ndim == 2


def param_groups(
    net: nn.Module, lr: float, weight_decay: float, muon_lr: float | None = None, muon_weight_decay: float = 0.0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(muon groups, adamw groups) of `net`'s trainable parameters, each group with its `peak_lr`.

    AdamW: weight decay on the other weights, none on biases, norm and LayerScale vectors, or
    `net.no_weight_decay()` (positions, class and register tokens). With `muon_lr` None every
    parameter goes to AdamW and the muon list is empty."""
    skip = net.no_weight_decay()
    muon, decay, no_decay = [], [], []
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        if muon_lr is not None and uses_muon(name, p):
            muon.append(p)
        elif p.ndim <= 1 or name in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    adamw = [
        {"params": decay, "weight_decay": weight_decay, "lr": lr, "peak_lr": lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": lr, "peak_lr": lr},
    ]
    muon_groups = (
        [{"params": muon, "weight_decay": muon_weight_decay, "lr": muon_lr, "peak_lr": muon_lr}] if muon else []
    )
    return muon_groups, adamw


class MuonAdamW(torch.optim.Optimizer):
    """`torch.optim.Muon` over `muon_groups` and `torch.optim.AdamW` over `adamw_groups`, stepped
    as one optimizer. The state dict holds both: {"muon": ..., "adamw": ...}."""

    def __init__(
        self,
        muon_groups: list[dict[str, Any]],
        adamw_groups: list[dict[str, Any]],
        betas: tuple[float, float] = (0.9, 0.999),
        momentum: float = 0.95,
        nesterov: bool = True,
        fused: bool = False,
    ) -> None:
        self.muon = Muon(muon_groups, momentum=momentum, nesterov=nesterov)
        self.adamw = torch.optim.AdamW(adamw_groups, betas=betas, fused=fused or None)
        params: Iterable[torch.Tensor] = [
            p for o in (self.muon, self.adamw) for g in o.param_groups for p in g["params"]
        ]
        super().__init__(list(params), defaults={})
        # The groups are the inner optimizers' own dicts: setting a group's lr here sets it there.
        self.param_groups = self.muon.param_groups + self.adamw.param_groups

    @property
    def state(self) -> dict[torch.Tensor, Any]:  # type: ignore[override]
        return {**self.muon.state, **self.adamw.state}

    @state.setter
    def state(self, value: Any) -> None:  # Optimizer.__init__ assigns an empty state: nothing to keep
        pass

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()  # forward + backward once, for both optimizers
        self.muon.step()
        self.adamw.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != {"muon", "adamw"}:
            raise ValueError(
                "this optimizer state is not MuonAdamW's (keys: "
                f"{sorted(state_dict)}); resume it with the optimizer it was saved with (optim.muon_lr)"
            )
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        self.param_groups = self.muon.param_groups + self.adamw.param_groups


def build_optimizer(
    net: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    muon_lr: float | None = None,
    muon_momentum: float = 0.95,
    muon_weight_decay: float = 0.0,
    lookahead_k: int | None = None,
    fused: bool = False,
) -> torch.optim.Optimizer:
    """AdamW over every parameter, or (with `muon_lr`) MuonAdamW; with `lookahead_k`, inside
    Lookahead syncing every `lookahead_k` steps (its alpha starts at 1: set by the schedule);
    `fused`: AdamW's fused kernel (None leaves torch's default, foreach)."""
    muon, adamw = param_groups(net, lr, weight_decay, muon_lr, muon_weight_decay)
    if not muon:
        opt: torch.optim.Optimizer = torch.optim.AdamW(adamw, lr=lr, betas=tuple(betas), fused=fused or None)
    else:
        opt = MuonAdamW(muon, adamw, betas=tuple(betas), momentum=muon_momentum, fused=fused)
    return Lookahead(opt, alpha=1.0, k=lookahead_k) if lookahead_k else opt
