"""The fine-tuning loop shared by the torch-backed adapters: augmentation, AdamW, validation, best checkpoint."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
from torch import nn

from bioadapt.adapters.base import FineTuneParams, FineTuneResult, Progress, Stop, held_out_first

Forward = Callable[[torch.Tensor], torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ScoreFn = Callable[[torch.Tensor, list[int]], float]  # (outputs of the held-out rows, those rows) -> higher is better


def augment(x: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, generator: torch.Generator
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random flips of every spatial axis, a 90-degree rotation in YX when square (Z is left alone: 3D
    stacks are usually anisotropic) and mild intensity jitter, one draw per batch."""
    spatial = list(range(2, x.dim()))

    def coin() -> bool:
        return bool(torch.rand((), generator=generator) < 0.5)

    flips = [d for d in spatial if coin()]
    if flips:
        x, target, valid = (t.flip(flips) for t in (x, target, valid))
    if x.shape[-1] == x.shape[-2]:
        k = int(torch.randint(0, 4, (), generator=generator))
        if k:
            x, target, valid = (t.rot90(k, dims=(-2, -1)) for t in (x, target, valid))
    scale = 1 + 0.1 * torch.randn((x.shape[0], x.shape[1]) + (1,) * len(spatial), generator=generator)
    shift = 0.1 * torch.randn(scale.shape, generator=generator)
    return x * scale.to(x.device) + shift.to(x.device), target, valid


def _set_train_mode(module: nn.Module, freeze_batchnorm: bool) -> None:
    module.train()
    if freeze_batchnorm:
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) or getattr(m, "original_name", "").startswith(
                    "BatchNorm"):
                m.eval()


def split_indices(n: int, val_fraction: float, seed: int, eligible: Collection[int] | None = None
                  ) -> tuple[list[int], list[int]]:
    """Shuffled train and held-out indices; at least one of each when there are two samples or more. With
    ``eligible``, the held-out indices come from it alone (as many as it has, up to the share); an empty or missing
    ``eligible`` lets every index be held out."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = 0 if n < 2 or val_fraction == 0 else min(n - 1, max(1, round(n * val_fraction)))
    held_out = held_out_first(order, n_val, eligible)
    chosen = set(held_out)
    return [i for i in order if i not in chosen], held_out


def fit(module: nn.Module, forward: Forward, inputs: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor,
        loss_fn: LossFn, score_fn: ScoreFn, params: FineTuneParams, progress: Progress | None = None,
        stop: Stop | None = None, groups: Sequence[int] | None = None,
        validate_on: Collection[int] | None = None) -> FineTuneResult:
    """Train ``module`` (through ``forward``) on preprocessed, padded ``inputs``; leave it with the weights that
    scored best on the held-out split (the starting weights count as epoch 0) and in eval mode. With
    ``params.patience``, the run ends after that many epochs without a better held-out score.

    ``groups``: the patch each input row was cut from (a patch may give several blocks); the held-out split
    takes whole patches, so no patch is both trained on and scored. ``n_train``/``n_val`` count patches.
    ``validate_on``: the patches (values of ``groups``) the held-out split may take, the ones the starting weights
    never trained on (see :meth:`Adapter.fine_tune`)."""
    started = time.perf_counter()
    torch.manual_seed(params.seed)
    generator = torch.Generator().manual_seed(params.seed)
    groups = list(range(len(inputs))) if groups is None else [int(g) for g in groups]
    patches = sorted(set(groups))
    fresh = None if validate_on is None else set(validate_on)
    eligible = None if fresh is None else [i for i, g in enumerate(patches) if g in fresh]
    train_patches, val_patches = split_indices(len(patches), params.val_fraction, params.seed, eligible)
    held_out = {patches[i] for i in val_patches}
    train_idx = [i for i, g in enumerate(groups) if g not in held_out]
    val_idx = [i for i, g in enumerate(groups) if g in held_out]
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=params.learning_rate, weight_decay=params.weight_decay)
    steps_per_epoch = math.ceil(len(train_idx) / params.batch_size)
    schedule = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=params.epochs * steps_per_epoch)
                if params.lr_schedule == "cosine" else None)

    def validate() -> float | None:
        if not val_idx:
            return None
        module.eval()
        with torch.no_grad():
            out = torch.cat([forward(inputs[i:i + 1]) for i in val_idx])
        return score_fn(out, val_idx)

    best_score = initial = validate()
    best_state = copy.deepcopy(module.state_dict())
    best_epoch, epoch, stopped, stopped_early = 0, 0, False, False
    history: list[dict[str, Any]] = []
    for epoch in range(1, params.epochs + 1):
        _set_train_mode(module, params.freeze_batchnorm)
        order = [train_idx[i] for i in torch.randperm(len(train_idx), generator=generator).tolist()]
        losses = []
        for step in range(steps_per_epoch):
            if stop is not None and stop():
                stopped = True
                break
            batch = order[step * params.batch_size:(step + 1) * params.batch_size]
            x, t, v = inputs[batch], targets[batch], valid[batch]
            if params.augment:
                x, t, v = augment(x, t, v, generator)
            loss = loss_fn(forward(x), t, v)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
            losses.append(float(loss.detach()))
        if stopped and not losses:
            epoch -= 1
            break
        score = validate()
        record = {"epoch": epoch, "epochs": params.epochs, "steps": len(losses),
                  "loss": sum(losses) / len(losses), "val_score": score,
                  "seconds": round(time.perf_counter() - started, 3)}
        history.append(record)
        if score is None or best_score is None or score > best_score:
            best_score, best_epoch = score, epoch
            best_state = copy.deepcopy(module.state_dict())
        patience = params.patience_epochs
        stopped_early = (patience > 0 and best_score is not None and epoch - best_epoch >= patience
                         and epoch < params.epochs)
        if progress is not None:
            progress(dict(record, best_val_score=best_score, best_epoch=best_epoch, stopped_early=stopped_early))
        if stopped or stopped_early:
            break
    module.load_state_dict(best_state)
    module.eval()
    return FineTuneResult(epochs_run=epoch, best_epoch=best_epoch, initial_val_score=initial,
                          best_val_score=best_score, stopped=stopped,
                          seconds=round(time.perf_counter() - started, 3), n_train=len(train_patches),
                          n_val=len(val_patches), history=history, stopped_early=stopped_early,
                          val_patches=sorted(patches[i] for i in val_patches))
