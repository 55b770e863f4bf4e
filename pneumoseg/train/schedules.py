"""Optimizers and learning-rate schedules of a training stage."""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch

from .config import OptimizerConfig, SchedulerConfig

__all__ = ["build_optimizer", "StageSchedule"]


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimizerConfig, lr: float) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                           weight_decay=cfg.weight_decay)


class StageSchedule:
    """One stage's schedule: ``plateau`` (ReduceLROnPlateau on the monitored validation score, after
    each validation), ``cosine`` (CosineAnnealingLR per epoch; ``t_max`` defaults to the stage's
    epochs), ``onecycle`` (OneCycleLR per optimizer step: warm-up to ``lr`` then cosine down) or
    ``none``."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, *, lr: float, epochs: int,
                 steps_per_epoch: int, maximize: bool, total_steps: Optional[int] = None) -> None:
        """``total_steps``: the stage's optimizer steps where epochs differ in length (default
        ``epochs x steps_per_epoch``)."""
        self.name = cfg.name
        total = epochs * steps_per_epoch if total_steps is None else int(total_steps)
        self.scheduler: Optional[Any] = None
        if cfg.name == "plateau":
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="max" if maximize else "min", factor=cfg.factor, patience=cfg.patience,
                threshold=cfg.threshold, min_lr=cfg.min_lr)
        elif cfg.name == "cosine":
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
                optimizer, T_max=cfg.t_max or epochs, eta_min=cfg.eta_min)
        elif cfg.name == "onecycle":
            warmup = cfg.warmup
            if float(warmup * max(1, total)) - 1 == 0:
                # A warm-up of exactly one step ends at step 0, where it starts: OneCycleLR divided by
                # its zero length (ZeroDivisionError with warmup 0.1 over 10 steps, 0.2 over 5 ...).
                # A billionth more keeps the one step at the initial rate, then the peak.
                warmup *= 1 + 1e-9
            self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=lr, total_steps=max(1, total), pct_start=warmup,
                div_factor=cfg.div_factor, final_div_factor=cfg.final_div_factor, anneal_strategy="cos",
                cycle_momentum=False)
        self._total_steps = total
        self._steps = 0

    def after_step(self) -> None:
        """After every optimizer step."""
        if self.name == "onecycle":
            self._steps += 1
            if self._steps < self._total_steps:  # OneCycleLR refuses a step past its total
                assert self.scheduler is not None  # __init__ builds one for every name but "none"
                self.scheduler.step()

    def after_epoch(self, score: Optional[float]) -> None:
        """After every epoch, with the monitored validation score (None when it was not validated)."""
        if self.name in ("cosine", "plateau"):
            assert self.scheduler is not None  # as in after_step
            if self.name == "cosine":
                self.scheduler.step()
            elif score is not None:
                self.scheduler.step(score)

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "steps": self._steps,
                "scheduler": None if self.scheduler is None else self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._steps = int(state["steps"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
