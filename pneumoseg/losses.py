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

import functools
import math
from typing import Any, Optional, TypedDict, Union

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
_BUILT_WITH_CUDA = bool(_C.built_with_cuda())


def _loss_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if logits_dtype == torch.float64 else torch.float32


def _params(bce_weight: float, dice_weight: float, focal_weight: float, focal_gamma: float, smooth: float,
            pos_weight: float, per_image: bool) -> Any:
    return _C.ComboParams(bce_weight, dice_weight, focal_weight, focal_gamma, smooth, pos_weight, per_image)


# The loss sits in every training step, so its host path is kept short: tensors reach the native
# core as addresses and dtype codes (the inputs are contiguous, their dtypes already checked), and
# the current CUDA stream is read without building a torch.cuda.Stream.
class _DtypeCodes(dict):
    """torch dtype -> native dtype code: the loss's own dtypes by one dict lookup, any other (a custom
    op called directly) through the bridge, and the native core then names it in its error."""

    def __missing__(self, dtype: torch.dtype) -> Optional[int]:
        return _native.torch_dtype_code(dtype)


_CODE = _DtypeCodes((dtype, _native.torch_dtype_code(dtype)) for dtype in _TARGET_DTYPES)


# torch's raw current-stream query, looked up once (on a torch without it, a fallback that builds a
# torch.cuda.Stream answers).
_raw_current_stream = _native.torch_names().current_stream


def _place(t: torch.Tensor) -> tuple[int, int, int]:
    """(device code, device index, current stream) of a tensor, as the native core takes them."""
    if not t.is_cuda:
        return _native.CPU, 0, 0
    index = t.get_device()  # an int, without building a torch.device
    return _native.CUDA, index, _raw_current_stream(index)


def _rows(t: torch.Tensor) -> tuple[int, int]:
    n = t.shape[0]
    return n, (t.numel() // n if n else 0)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t``, or an aligned copy of it: the kernels read through typed pointers, and the native view
    refuses an address that is not a multiple of the element size (``torch.frombuffer(..., offset=1)``)."""
    return t.clone() if t.data_ptr() % t.element_size() else t


def _run_forward(logits: torch.Tensor, target: torch.Tensor, params) -> tuple[torch.Tensor, torch.Tensor]:
    """The native forward on contiguous (N, ...) tensors, read as (N, P) rows: (loss, state)."""
    logits, target = _aligned(logits), _aligned(target)
    device = logits.device
    n, p = _rows(logits)
    # Sizes as separate arguments: torch parses them about 1 us faster than a tuple.
    state = torch.empty(n, _STATE_COLS, dtype=torch.float64, device=device)
    dtype = logits.dtype
    loss = torch.empty((), dtype=_loss_dtype(dtype), device=device)
    loss_is_double = loss.dtype == torch.float64
    code, index, stream = _place(logits)
    if code == _native.CUDA and not _BUILT_WITH_CUDA:
        _native.require_cuda_build("logits")
    logits_ptr, target_ptr = logits.data_ptr(), target.data_ptr()
    if not logits_ptr or not target_ptr:  # the native core would read through a null pointer (a segfault)
        raise InvalidInputError("logits or target has no data (a FakeTensor outside its FakeTensorMode, or "
                                "freed storage); pass tensors that hold their values")
    _C.combo_loss_forward(logits_ptr, _CODE[dtype], target_ptr, _CODE[target.dtype], n, p, code,
                          index, state.data_ptr(), loss.data_ptr(), loss_is_double, params, stream)
    return loss, state


def _run_backward(grad_loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, state: torch.Tensor,
                  params) -> torch.Tensor:
    """The native backward: d loss / d logits (logits' shape) from the forward's state and the
    incoming gradient."""
    logits, target = _aligned(logits), _aligned(target)
    grad_logits = torch.empty_like(logits, memory_format=torch.contiguous_format)
    dtype = logits.dtype
    wanted = _loss_dtype(dtype)
    if grad_loss.dtype != wanted or grad_loss.get_device() != logits.get_device():
        grad_loss = grad_loss.to(device=logits.device, dtype=wanted)
    grad_loss = _aligned(grad_loss)
    n, p = _rows(logits)
    code, index, stream = _place(logits)
    _C.combo_loss_backward(grad_loss.data_ptr(), wanted == torch.float64, logits.data_ptr(), _CODE[dtype],
                           target.data_ptr(), _CODE[target.dtype], n, p, code, index, state.data_ptr(),
                           grad_logits.data_ptr(), params, stream)
    return grad_logits


# Under torch.compile the loss is a custom op (traceable, with a fake implementation); in eager mode
# the same native calls run through a plain autograd.Function, which costs a fraction of the custom
# op's dispatch (the per-call host time is what bounds small batches on a GPU).
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
    params = _params(bce_weight, dice_weight, focal_weight, focal_gamma, smooth, pos_weight, per_image)
    return _run_forward(logits, target, params)


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
    # Only the focal weight and the pixel parameters matter here: the rest is in `state`.
    params = _params(1.0, 1.0, focal_weight, focal_gamma, 1.0, pos_weight, False)
    return _run_backward(grad_loss, logits, target, state, params)


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


def _checked_forward(logits, target, params, check):
    loss, state = _run_forward(logits, target, params)
    # Checked here, on the plain state tensor (under torch.func the op's output is a wrapper).
    if check:
        if state.is_cuda:
            bad = int(state[:, _BAD_TARGETS].sum())
        else:  # a Python sum of the N counts: a third of NumPy's small-array reduction time
            bad = int(sum(state.numpy()[:, _BAD_TARGETS].tolist()))
        if bad:
            raise InvalidInputError(f"target has {bad} values outside [0, 1] (or NaN)")
    return loss, state


def _save_for_backward(ctx, logits, target, params, state):
    ctx.save_for_backward(logits, target, state)
    ctx.params = params
    ctx.set_materialize_grads(False)  # a missing gradient stays None: no zero tensor is built


def _gradient(ctx, grad_loss):
    """The eager backward: d loss / d logits from the saved inputs and state (None where no gradient
    is asked for or none arrives)."""
    logits, target, state = ctx.saved_tensors
    if not ctx.needs_input_grad[0] or grad_loss is None:
        return None
    if torch.is_grad_enabled():  # create_graph=True: the gradient must not pass for a constant
        return _FirstOrderGradient.apply(grad_loss, logits, target, state, ctx.params)
    return _run_backward(grad_loss, logits, target, state, ctx.params)


class _EagerComboLoss(torch.autograd.Function):
    """The eager-mode path: the same native forward and backward as the custom ops. It returns the
    loss only and saves the state as an intermediate: a second output cost autograd an output edge,
    a non-differentiable mark and a None gradient to pass back on every step."""

    @staticmethod
    def forward(ctx, logits, target, params, check):
        loss, state = _checked_forward(logits, target, params, check)
        _save_for_backward(ctx, logits, target, params, state)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return _gradient(ctx, grad_loss), None, None, None


class _FunctorchComboLoss(torch.autograd.Function):
    """The eager path under ``torch.func`` transforms, which need ``setup_context`` (``grad``,
    ``grad_and_value``, ``functional_call`` then ``grad``); ``vmap`` has no rule (the native op reads
    memory directly) and says so. Not the everyday path: with ``setup_context`` every ``apply`` binds
    its arguments through ``inspect.signature`` (tens of microseconds per training step)."""

    @staticmethod
    def forward(logits, target, params, check):
        return _checked_forward(logits, target, params, check)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target, params, _ = inputs
        state = output[1]
        ctx.mark_non_differentiable(state)
        _save_for_backward(ctx, logits, target, params, state)

    @staticmethod
    def backward(ctx, grad_loss, grad_state):
        return _gradient(ctx, grad_loss), None, None, None

    @staticmethod
    def vmap(info, in_dims, logits, target, params, check):
        raise _no_vmap()


# torch's own test for "a torch.func transform is running" (what autograd.Function.apply asks); a
# torch without it gets torch's error under torch.func instead.
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def _no_vmap() -> InvalidInputError:
    return InvalidInputError(
        "combo_loss does not support torch.func.vmap (nor jacrev / hessian, which vmap its gradient): "
        "it already takes a batch (N, 1, H, W), so call it on the stacked batch (per_image=True for a "
        "per-image Dice), and use torch.func.grad for its gradient"
    )


class _FirstOrderGradient(torch.autograd.Function):
    """The native gradient of the loss under ``create_graph=True``. It has no derivative of its own:
    left untracked, a gradient penalty through the loss silently lost its second-order term (the
    penalty's gradient was wrong by that term, without an error), so differentiating it raises."""

    @staticmethod
    def forward(grad_loss, logits, target, state, params):
        return _run_backward(grad_loss, logits, target, state, params)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad_grad_logits):
        raise NotImplementedError(
            "pneumoseg's combo_loss is differentiable once: its gradient has no derivative (a double "
            "backward, a gradient penalty through the loss, or a Hessian needs a loss written in torch ops)"
        )

    @staticmethod
    def vmap(info, in_dims, *args):
        raise _no_vmap()


_PLAIN_NUMBER_TYPES = frozenset((float, int, type(None)))
_STRIDED = torch.strided
_PLAIN_TENSOR_TYPES = frozenset((torch.Tensor, torch.nn.Parameter))
_fake_tensor_test = getattr(getattr(torch._subclasses, "fake_tensor", None), "is_fake", None)


def _is_fake(t: torch.Tensor) -> bool:
    """A FakeTensor (or a functional wrapper of one): metadata without data."""
    return _fake_tensor_test is not None and bool(_fake_tensor_test(t))


@functools.lru_cache(maxsize=64, typed=True)
def _plain_params(bce_weight, dice_weight, focal_weight, focal_gamma, smooth, pos_weight, per_image):
    # Plain Python numbers validate the same way every time, so the validated native parameters are
    # cached per argument tuple (typed: 1, 1.0 and True are different keys; errors are never cached).
    weights = _checked_weights(bce_weight, dice_weight, focal_weight, focal_gamma, smooth, pos_weight)
    return _params(*weights.values(), check_bool(per_image, "per_image"))


def _number(value, name: str) -> float:
    """A non-negative finite weight: a real number or a one-element tensor, never a bool or a str."""
    if isinstance(value, torch.Tensor) and value.requires_grad:
        # read as a constant: a learnable weight would silently get no gradient
        raise InvalidInputError(f"{name} is a tensor that requires grad, but combo_loss reads its weights as "
                                f"constants (no gradient reaches them): pass {name}.detach() or a float, or "
                                f"weight the loss terms yourself")
    if type(value) in (float, int) and torch.compiler.is_compiling():
        # Under torch.compile(dynamic=True) dynamo turns float arguments (the defaults too) into
        # symbolic floats, and math.isnan on one breaks the graph: fullgraph=True failed on every
        # call. One comparison checks the same (NaN fails it) and traces.
        number = float(value)
        if not 0.0 <= number < math.inf:
            raise InvalidInputError(f"{name} must be a finite number >= 0, got {value!r}")
        return number
    return check_real(value, name, low=0.0)


class _Weights(TypedDict):
    bce_weight: float
    dice_weight: float
    focal_weight: float
    focal_gamma: float
    smooth: float
    pos_weight: float


def _checked_weights(bce_weight, dice_weight, focal_weight, focal_gamma, smooth, pos_weight) -> _Weights:
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
    if (logits.layout != _STRIDED or target.layout != _STRIDED or logits.is_nested or target.is_nested):
        check_array_object(logits, "logits")  # says which one and why
        check_array_object(target, "target")
    if logits.dtype not in _LOGIT_DTYPES:
        raise InvalidInputError(f"logits must be a floating tensor (float16/bfloat16/float32/float64), got {logits.dtype}")
    if target.dtype not in _TARGET_DTYPES:
        raise InvalidInputError(f"target must be float, uint8 or bool, got {target.dtype}")
    shape = logits.shape
    if len(shape) == 4 and shape[1] != 1:
        raise InvalidInputError(f"logits must have one channel, got shape {tuple(shape)}")
    if len(shape) not in (3, 4):
        raise InvalidInputError(f"logits must be (N, 1, H, W) or (N, H, W), got shape {tuple(shape)}")
    if target.shape != shape:
        raise InvalidInputError(f"target shape {tuple(target.shape)} differs from logits shape {tuple(shape)}")
    if not (logits.is_cpu or logits.is_cuda):
        raise InvalidInputError(f"logits is on device {logits.device}; pneumoseg runs on CPU and CUDA tensors")
    # is_cpu too: a meta target beside CPU logits has the same get_device() (-1) and no memory
    if target.is_cpu != logits.is_cpu or target.is_cuda != logits.is_cuda or target.get_device() != logits.get_device():
        raise InvalidInputError(f"target is on {target.device} but logits on {logits.device}")
    n = shape[0]
    if n == 0:
        raise InvalidInputError("logits is an empty batch")
    if logits.numel() == 0:
        raise InvalidInputError(f"logits has images with no pixels, shape {tuple(shape)}")
    if validate is not None and validate is not True and validate is not False:
        validate = check_bool(validate, "validate", allow_none=True)
    # FakeTensors (FakeTensorMode, make_fx) hold no data: they go through the custom op, whose fake
    # implementation answers, as under torch.compile (the native core would read a null pointer).
    compiling = torch.compiler.is_compiling() or (
        (type(logits) not in _PLAIN_TENSOR_TYPES or type(target) not in _PLAIN_TENSOR_TYPES)
        and (_is_fake(logits) or _is_fake(target)))
    if not compiling and (logits.is_neg() or target.is_neg()):  # a lazily negated view: memory holds -x
        logits, target = logits.resolve_neg(), target.resolve_neg()
    plain = _PLAIN_NUMBER_TYPES
    if (not compiling and type(per_image) is bool and type(bce_weight) in plain and type(dice_weight) in plain
            and type(focal_weight) in plain and type(focal_gamma) in plain and type(smooth) in plain
            and type(pos_weight) in plain):
        # The common eager call: weights are plain numbers, validated once and cached.
        params = _plain_params(bce_weight, dice_weight, focal_weight, focal_gamma, smooth, pos_weight, per_image)
    else:
        per_image = check_bool(per_image, "per_image")
        weights = _checked_weights(bce_weight, dice_weight, focal_weight, focal_gamma, smooth, pos_weight)
        params = None if compiling else _params(**weights, per_image=per_image)
    if compiling:
        x = logits.reshape(n, -1).contiguous()
        t = target.reshape(n, -1).contiguous()
        loss, state = _combo_forward(
            x, t, weights["bce_weight"], weights["dice_weight"], weights["focal_weight"], weights["focal_gamma"],
            weights["smooth"], weights["pos_weight"], per_image,
        )
    else:
        # Eager: the tensors go in as they are (copied only when not contiguous) and are read as (N, P)
        # rows natively; every torch op saved here is host time saved in each training step.
        x = logits if logits.is_contiguous() else logits.contiguous()
        t = target if target.is_contiguous() else target.contiguous()
        check = not logits.is_cuda if validate is None else validate
        if _functorch_active():
            loss, _ = _FunctorchComboLoss.apply(x, t, params, check)
        else:
            loss = _EagerComboLoss.apply(x, t, params, check)
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
        self.kwargs: dict[str, Any] = {
            **_checked_weights(bce_weight, dice_weight, focal_weight, focal_gamma, smooth, pos_weight),
            "per_image": check_bool(per_image, "per_image"),
            "validate": check_bool(validate, "validate", allow_none=True),
        }

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return combo_loss(logits, target, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.kwargs.items())
