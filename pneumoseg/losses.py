"""Segmentation losses as fused native ops: BCE + soft Dice (+ focal) in one forward reduction and one
backward elementwise pass, on CPU tensors and on CUDA tensors (on the caller's stream).

Definitions, with p = sigmoid(x) and t in [0, 1]:

- BCE = mean over pixels of ``max(x, 0) - x t + log1p(exp(-|x|))``, with ``pos_weight`` weighting the
  positive term exactly as ``torch.nn.functional.binary_cross_entropy_with_logits`` does;
- Dice = 1 - (2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth) over the whole batch, or per image
  and then averaged with ``per_image=True``;
- focal = mean over pixels of ``(1 - p_t)^gamma * BCE_pixel`` with p_t = p where t = 1 and 1 - p where
  t = 0 (``p t + (1 - p)(1 - t)`` for soft labels), BCE_pixel including ``pos_weight``.

The loss is ``bce_weight * BCE + dice_weight * Dice + focal_weight * focal``, returned as a float32
scalar (float64 for float64 logits); its gradient flows to the logits only.

The ops are registered with ``torch.library.custom_op`` (with fake functions and autograd), so
``torch.compile(..., fullgraph=True)`` and ``torch.autograd.gradcheck`` work.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from . import _native
from ._checks import check_array_object, check_bool, check_real
from ._native import _C
from .errors import InvalidInputError

__all__ = ["combo_loss", "ComboLoss"]

_STATE_COLS = int(_C.COMBO_STATE_COLS)
_BAD_TARGETS = 5
_LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TARGET_DTYPES = _LOGIT_DTYPES + (torch.uint8, torch.bool)


def _loss_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if logits_dtype == torch.float64 else torch.float32


def _params(bce_weight, dice_weight, focal_weight, focal_gamma, smooth, pos_weight, per_image):
    return _C.ComboParams(bce_weight, dice_weight, focal_weight, focal_gamma, smooth, pos_weight, per_image)


def _view(t: torch.Tensor, name: str):
    return _native.as_view(t, name)


@torch.library.custom_op("pneumoseg::combo_loss_forward", mutates_args=())
def _combo_forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    bce_weight: float,
    dice_weight: float,
    focal_weight: float,
    focal_gamma: float,
    smooth: float,
    pos_weight: float,
    per_image: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    state = torch.empty((logits.shape[0], _STATE_COLS), dtype=torch.float64, device=logits.device)
    loss = torch.empty((), dtype=_loss_dtype(logits.dtype), device=logits.device)
    x, t = _view(logits, "logits"), _view(target, "target")
    if x.device == _native.CUDA:
        _native.require_cuda_build("logits")
    params = _params(bce_weight, dice_weight, focal_weight, focal_gamma, smooth, pos_weight, per_image)
    _C.combo_loss_forward(x.view, t.view, _view(state, "state").view, _view(loss, "loss").view, params, x.stream)
    return loss, state


@_combo_forward.register_fake
def _combo_forward_fake(logits, target, bce_weight, dice_weight, focal_weight, focal_gamma, smooth, pos_weight, per_image):
    state = logits.new_empty((logits.shape[0], _STATE_COLS), dtype=torch.float64)
    return logits.new_empty((), dtype=_loss_dtype(logits.dtype)), state


@torch.library.custom_op("pneumoseg::combo_loss_backward", mutates_args=())
def _combo_backward(
    grad_loss: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    state: torch.Tensor,
    focal_weight: float,
    focal_gamma: float,
    pos_weight: float,
) -> torch.Tensor:
    grad_logits = torch.empty_like(logits)
    g = grad_loss.to(_loss_dtype(logits.dtype)).contiguous()
    x = _view(logits, "logits")
    # Only the focal weight and the pixel parameters matter here: the rest is in `state`.
    params = _params(1.0, 1.0, focal_weight, focal_gamma, 1.0, pos_weight, False)
    _C.combo_loss_backward(
        _view(g, "grad_loss").view, x.view, _view(target, "target").view, _view(state, "state").view,
        _view(grad_logits, "grad_logits").view, params, x.stream,
    )
    return grad_logits


@_combo_backward.register_fake
def _combo_backward_fake(grad_loss, logits, target, state, focal_weight, focal_gamma, pos_weight):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    logits, target, _, _, focal_weight, focal_gamma, _, pos_weight, _ = inputs
    _, state = output
    ctx.save_for_backward(logits, target, state)
    ctx.pixel_params = (focal_weight, focal_gamma, pos_weight)


def _backward(ctx, grad_loss, grad_state):
    logits, target, state = ctx.saved_tensors
    grad_logits = None
    if ctx.needs_input_grad[0]:
        grad_logits = _combo_backward(grad_loss, logits, target, state, *ctx.pixel_params)
    return grad_logits, None, None, None, None, None, None, None, None


_combo_forward.register_autograd(_backward, setup_context=_setup_context)


def _number(value, name: str) -> float:
    """A non-negative finite weight: a real number or a one-element tensor, never a bool or a str."""
    return check_real(value, name, low=0.0)


def _checked_weights(bce_weight, dice_weight, focal_weight, focal_gamma, smooth, pos_weight) -> dict[str, float]:
    """The loss's numeric arguments, validated (non-negative and finite) and as floats."""
    return dict(
        bce_weight=_number(bce_weight, "bce_weight"),
        dice_weight=_number(dice_weight, "dice_weight"),
        focal_weight=_number(focal_weight, "focal_weight"),
        focal_gamma=_number(focal_gamma, "focal_gamma"),
        smooth=_number(smooth, "smooth"),
        pos_weight=1.0 if pos_weight is None else _number(pos_weight, "pos_weight"),
    )


def combo_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    bce_weight: float = 1.0,
    dice_weight: float = 1.0,
    focal_weight: float = 0.0,
    focal_gamma: float = 2.0,
    per_image: bool = False,
    smooth: float = 1.0,
    pos_weight: Optional[Union[float, torch.Tensor]] = None,
    validate: Optional[bool] = None,
) -> torch.Tensor:
    """The weighted BCE + Dice + focal loss of ``logits`` (N, 1, H, W) or (N, H, W) against ``target``
    of the same shape (float soft labels, uint8 or bool).

    ``validate`` checks that targets lie in [0, 1]: always on CPU tensors (free); on CUDA tensors only
    when ``validate=True``, since reading the answer back costs a host synchronisation. Unchecked
    invalid targets make the loss NaN, never a plausible number.
    """
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise InvalidInputError("logits and target must be torch tensors")
    check_array_object(logits, "logits")
    check_array_object(target, "target")
    per_image = check_bool(per_image, "per_image")
    validate = check_bool(validate, "validate", allow_none=True)
    if logits.dtype not in _LOGIT_DTYPES:
        raise InvalidInputError(f"logits must be a floating tensor (float16/bfloat16/float32/float64), got {logits.dtype}")
    if target.dtype not in _TARGET_DTYPES:
        raise InvalidInputError(f"target must be float, uint8 or bool, got {target.dtype}")
    if logits.dim() == 4 and logits.shape[1] != 1:
        raise InvalidInputError(f"logits must have one channel, got shape {tuple(logits.shape)}")
    if logits.dim() not in (3, 4):
        raise InvalidInputError(f"logits must be (N, 1, H, W) or (N, H, W), got shape {tuple(logits.shape)}")
    if target.shape != logits.shape:
        raise InvalidInputError(f"target shape {tuple(target.shape)} differs from logits shape {tuple(logits.shape)}")
    if target.device != logits.device:
        raise InvalidInputError(f"target is on {target.device} but logits on {logits.device}")
    n = logits.shape[0]
    if n == 0:
        raise InvalidInputError("logits is an empty batch")
    if logits[0].numel() == 0:
        raise InvalidInputError(f"logits has images with no pixels, shape {tuple(logits.shape)}")
    weights = _checked_weights(bce_weight, dice_weight, focal_weight, focal_gamma, smooth, pos_weight)
    x = logits.reshape(n, -1).contiguous()
    t = target.reshape(n, -1).contiguous()
    loss, state = _combo_forward(
        x, t, weights["bce_weight"], weights["dice_weight"], weights["focal_weight"], weights["focal_gamma"],
        weights["smooth"], weights["pos_weight"], per_image,
    )
    check = logits.device.type == "cpu" if validate is None else validate
    if check and not torch.compiler.is_compiling():
        bad = int(state[:, _BAD_TARGETS].sum().item())
        if bad:
            raise InvalidInputError(f"target has {bad} values outside [0, 1] (or NaN)")
    return loss


class ComboLoss(torch.nn.Module):
    """``combo_loss`` as a module; the winning SIIM-ACR solution used weights like (bce, dice, focal) =
    (3, 1, 4)."""

    def __init__(
        self,
        *,
        bce_weight: float = 1.0,
        dice_weight: float = 1.0,
        focal_weight: float = 0.0,
        focal_gamma: float = 2.0,
        per_image: bool = False,
        smooth: float = 1.0,
        pos_weight: Optional[float] = None,
        validate: Optional[bool] = None,
    ) -> None:
        super().__init__()
        # Validated now, so a bad weight fails where the module is built, not at the first batch.
        self.kwargs = _checked_weights(bce_weight, dice_weight, focal_weight, focal_gamma, smooth, pos_weight)
        self.kwargs.update(per_image=check_bool(per_image, "per_image"),
                           validate=check_bool(validate, "validate", allow_none=True))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return combo_loss(logits, target, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.kwargs.items())
