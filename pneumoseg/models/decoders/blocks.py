"""The decoders' building blocks, with segmentation_models_pytorch's module names
(``segmentation_models_pytorch/base/modules.py``), so an smp decoder's state-dict keys and shapes are ours.

A block's "nearest x2 upsample, concatenate the skip features, 3x3 convolution" runs as a sub-pixel
convolution (:func:`upsample_conv3x3`): the same function, without the upsampled or concatenated map.
For inference, :func:`freeze_subpixel_weights` computes that convolution's weights once instead of on
every forward."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, cast

import torch
from torch import nn
from torch.autograd import forward_ad
import torch.nn.functional as F

__all__ = ["ATTENTIONS", "Conv2dReLU", "SCSEModule", "Attention", "DecoderBlock", "initialize_decoder",
           "initialize_head", "upsample_conv3x3", "set_subpixel_decoding", "subpixel_decoding",
           "freeze_subpixel_weights", "unfreeze_subpixel_weights"]

ATTENTIONS = (None, "scse")


class Conv2dReLU(nn.Sequential):
    """3x3 convolution (no bias: BatchNorm follows), BatchNorm, ReLU; keys ``0.weight``, ``1.*``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class SCSEModule(nn.Module):
    """Concurrent spatial and channel squeeze-and-excitation (Roy et al., 2018):
    ``x * cSE(x) + x * sSE(x)``, cSE a bottleneck of ``channels // reduction`` on the pooled map."""

    def __init__(self, in_channels: int, reduction: int = 16) -> None:
        super().__init__()
        # smp uses in_channels // reduction; at least one channel, where smp would fail to build.
        hidden = max(1, in_channels // reduction)
        self.cSE = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, in_channels, 1),
            nn.Sigmoid(),
        )
        self.sSE = nn.Sequential(nn.Conv2d(in_channels, 1, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.cSE(x) + x * self.sSE(x)


class Attention(nn.Module):
    """``None`` (identity) or ``"scse"``; the wrapper keeps smp's ``attention.`` level in the keys."""

    def __init__(self, name: Optional[str], in_channels: int) -> None:
        super().__init__()
        self.attention = nn.Identity() if name is None else SCSEModule(in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x)


class DecoderBlock(nn.Module):
    """Nearest x2 upsampling, concatenation with the skip features, [attention], conv-BN-ReLU x2,
    [attention]: smp's ``UnetDecoderBlock`` / UNet++ ``DecoderBlock``.

    A block without skip features (the last one, at full resolution) has no ``attention1``: smp builds
    one there but never calls it. Its keys in an smp checkpoint are dropped on loading (they cannot
    change the function), so smp state dicts still load with ``strict=True``, and every parameter
    here gets a gradient (no ``find_unused_parameters`` under DDP).
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, attention: Optional[str]) -> None:
        super().__init__()
        self.has_skip = skip_channels > 0
        self.conv1 = Conv2dReLU(in_channels + skip_channels, out_channels)
        if self.has_skip:
            self.attention1 = Attention(attention, in_channels + skip_channels)
        else:
            self.register_load_state_dict_pre_hook(_drop_unused_attention1)
        self.conv2 = Conv2dReLU(out_channels, out_channels)
        self.attention2 = Attention(attention, out_channels)
        self.upsampled_channels = in_channels
        # freeze_subpixel_weights' precomputed weights: not in the state dict, dropped by load_state_dict
        for name in _FROZEN:
            self.register_buffer(name, None, persistent=False)
        self._frozen_key: Optional[tuple] = None
        # aliases of the tensors the frozen weights came from: while they live, no other tensor can be
        # allocated at their address, so a data pointer in _frozen_key names one tensor's storage
        self._frozen_sources: Optional[tuple] = None
        self.register_load_state_dict_post_hook(_unfreeze_after_loading)

    # freeze_subpixel_weights' buffers (registered in __init__, None while not frozen)
    _frozen_phase_weight: Optional[torch.Tensor]
    _frozen_phase_bias: Optional[torch.Tensor]
    _frozen_skip_weight: Optional[torch.Tensor]

    #: run the upsampling, concatenation and ``conv1``'s convolution as one sub-pixel convolution where
    #: that is the same function (no scSE before ``conv1``); ``False`` (per block, or for a whole model
    #: with :func:`set_subpixel_decoding`) runs the reference formulation. Not part of the state dict.
    subpixel: bool = True

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        conv = cast(nn.Conv2d, self.conv1[0])  # Conv2dReLU's convolution (BatchNorm folding keeps it)
        if (self._frozen_phase_weight is not None and _wants_gradient(conv.weight, conv.bias)
                and not torch.compiler.is_compiling()):
            # conv1 is being differentiated, so probably trained, and a fused optimizer's step moves no
            # version counter: the frozen weights end here (a trace cannot change the module)
            self._unfreeze_subpixel()
        if self.subpixel and self._subpixel_is_exact(skip is not None):
            # read once: another thread's unfreeze between the check and the use must not reach here
            frozen = self._frozen_buffers()
            if self._frozen_weights_apply(skip is not None, frozen):
                phase_weight, phase_bias, skip_weight = frozen
                x = _upsample_conv3x3_phases(x, skip, phase_weight, phase_bias, skip_weight, conv.bias,
                                             conv.out_channels)
            else:
                x = upsample_conv3x3(x, skip, conv.weight, conv.bias)
            for i, layer in enumerate(self.conv1):  # conv1's BatchNorm (or, folded, Identity) and ReLU
                if i:
                    x = layer(x)
            return self.attention2(self.conv2(x))
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if skip is not None:
            x = self.attention1(torch.cat([x, skip], dim=1))
        return self.attention2(self.conv2(self.conv1(x)))

    def _subpixel_is_exact(self, has_skip: bool) -> bool:
        # scSE's spatial gate weighs the concatenated map pixel by pixel at full resolution: no
        # low-resolution convolution computes that, so such blocks keep the reference path.
        if has_skip and not isinstance(self.attention1.attention, nn.Identity):
            return False
        conv = cast(nn.Conv2d, self.conv1[0])
        # conv1, its convolution and attention1 are not called on this path: a hook on any of them (the
        # old weight_norm sets the weight in a pre-hook; Grad-CAM and feature extractors hook conv1), or a
        # global module hook, must run, so such a block keeps the reference path too
        skipped = (self.conv1, conv, self.attention1, self.attention1.attention) if has_skip else (self.conv1, conv)
        if _global_hooks() or any(_has_hooks(m) for m in skipped):
            return False
        return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
                and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
                and conv.padding_mode == "zeros")

    def _freeze_subpixel(self) -> bool:
        """Precompute the sub-pixel weights from conv1's current weight and bias; False (and nothing
        stored) for a block that does not take the sub-pixel path."""
        self._unfreeze_subpixel()
        if not (self.subpixel and self._subpixel_is_exact(self.has_skip)):
            return False
        conv = cast(nn.Conv2d, self.conv1[0])
        weight, bias = conv.weight, conv.bias
        channels = self.upsampled_channels
        if _is_functorch(weight, bias) or (weight.shape[1] > channels) != self.has_skip:
            return False
        # plain tensors even when called under inference_mode (an eval-mode forward with autograd on
        # must be able to use them); the same arithmetic as upsample_conv3x3's
        with torch.inference_mode(False), torch.no_grad():
            # in conv1's memory format: conv2d would otherwise convert a channels_last block's phase
            # weight on every call (26 ms of a 296 ms U-Net ResNet50 forward at 256 px on a CPU)
            self._frozen_phase_weight = _subpixel_weight(weight[:, :channels]).contiguous(
                memory_format=_memory_format(weight))
            if self.has_skip:
                # dense, in the memory format conv2d would pick for the slice
                self._frozen_skip_weight = weight[:, channels:].clone(memory_format=torch.preserve_format)
            elif bias is not None:
                self._frozen_phase_bias = _phase_bias(bias)
        self._frozen_key = (self.has_skip, _tensor_key(weight), _tensor_key(bias))
        # (conv1's weight, its bias, the frozen weights as stored): what the eager check compares with
        self._frozen_sources = (weight.detach(), None if bias is None else bias.detach(),
                                tuple(getattr(self, name) for name in _FROZEN))
        return True

    def _unfreeze_subpixel(self) -> bool:
        frozen = self._frozen_phase_weight is not None
        for name in _FROZEN:
            setattr(self, name, None)
        self._frozen_key = None
        self._frozen_sources = None
        return frozen

    def train(self, mode: bool = True) -> "DecoderBlock":
        # A model put in training mode is about to change, and not every change moves a version counter
        # (fused optimizers, writes through .data): the frozen weights end here. (A compiled trace
        # guards on them being None, so it retraces instead of serving old weights.)
        if mode:
            self._unfreeze_subpixel()
        return super().train(mode)

    def __getstate__(self) -> dict:
        # deepcopy, pickle, torch.save: the copy's weights are new tensors, so its frozen weights (and
        # the aliases of the originals) could never apply there, only take memory
        state = super().__getstate__()
        if self._frozen_phase_weight is not None:
            state["_buffers"] = {k: None if k in _FROZEN else v for k, v in state["_buffers"].items()}
            state["_frozen_key"] = state["_frozen_sources"] = None
        return state

    def _apply(self, fn, recurse: bool = True):
        # .to() / .half() / share_memory(): a conversion that replaced conv1's weight or the frozen
        # weights themselves (cast, moved) ends them, rather than keeping unused copies beside the
        # new weights; a conversion that changed nothing (a no-op .to()) keeps them
        out = super()._apply(fn, recurse)
        if self._frozen_phase_weight is not None and not self._frozen_match(self._frozen_buffers()):
            self._unfreeze_subpixel()
        return out

    def _frozen_buffers(self) -> tuple:
        return tuple(getattr(self, name) for name in _FROZEN)

    def _frozen_weights_apply(self, has_skip: bool, frozen: Optional[tuple] = None) -> bool:
        """Whether forward may use the frozen weights (``frozen``: the block's, read by the caller):
        eval mode, no gradient wanted for conv1's weight, and (in eager runs, where it can be read)
        conv1's weight and bias still the very tensors, unmodified, that they were computed from."""
        frozen = self._frozen_buffers() if frozen is None else frozen
        if frozen[0] is None or self.training:
            return False
        conv = cast(nn.Conv2d, self.conv1[0])
        weight, bias = conv.weight, conv.bias
        if _wants_gradient(weight, bias):
            return False
        key = self._frozen_key
        if key is None:
            return False
        if torch.compiler.is_compiling():
            # versions and data pointers cannot be traced: what a trace can see (and guards on)
            return (key[0] == has_skip and key[1][:2] == (weight.dtype, weight.device)
                    and (bias is None) == (key[2][0] is None))
        if _is_functorch(weight, bias) or _has_tangent(weight, bias):
            return False
        return key[0] == has_skip and self._frozen_match(frozen)

    def _frozen_match(self, frozen: tuple) -> bool:
        """``frozen`` are the weights freezing stored (not, say, another model's, passed to
        ``functional_call`` as buffers), and conv1's weight and bias are, unmodified, the tensors they
        came from, in the storage they came from (a recorded pointer of a copied or unpickled model
        names another model's or another process's memory)."""
        key, sources = self._frozen_key, self._frozen_sources
        if key is None or sources is None or any(a is not b for a, b in zip(frozen, sources[2])):
            return False
        conv = cast(nn.Conv2d, self.conv1[0])
        weight, bias = conv.weight, conv.bias
        # Two pointer tests, each needed: the recorded one catches a storage moved in place (share_memory,
        # which moves the alias too); the alias's catches a new tensor at the recorded address once the
        # old storage was freed in place (FSDP's resize_(0)). Equal keys mean the same bias is None.
        return (key[1:] == (_tensor_key(weight), _tensor_key(bias))
                and all(t is None or t.data_ptr() == s.data_ptr() for t, s in zip((weight, bias), sources[:2])))


_FROZEN = ("_frozen_phase_weight", "_frozen_phase_bias", "_frozen_skip_weight")


def _tensor_key(t: Optional[torch.Tensor]) -> tuple:
    """What changes when a weight is replaced (``load_state_dict`` copies in place, ``.to()`` swaps
    the data, an optimizer steps in place): dtype, device, data pointer, version counter, shape and
    strides."""
    if t is None:
        return (None, None, None, None, None, None)
    return (t.dtype, t.device, t.data_ptr(), t._version, tuple(t.shape), t.stride())


def _unfreeze_after_loading(module: DecoderBlock, incompatible_keys) -> None:
    module._unfreeze_subpixel()


def freeze_subpixel_weights(model: nn.Module) -> int:
    """Precompute, once, the weights every sub-pixel :class:`DecoderBlock` in ``model`` derives from its
    ``conv1`` on each forward (the ``(4 O, C, 2, 2)`` phase weight, the skip features' part of the
    3x3 weight, the phase bias), from the current weights; returns how many blocks it froze.

    For a model that will no longer change: an inference copy, after BatchNorm folding, the dtype
    cast, the move to its device and memory format, and before CUDA-graph capture,
    ``torch.compile`` or export. Exactly the arithmetic of the unfrozen path (same outputs, bit for
    bit). The precomputed weights are non-persistent buffers: the state dict is unchanged.

    Frozen weights end (dropped: blocks compute again until this is called again) with
    ``model.train()``, a forward that wants a gradient for ``conv1``'s weight or bias (fused
    optimizers step without moving version counters, so any training ends them),
    ``load_state_dict``, and a ``.to()`` / ``.half()`` / ``share_memory()`` that replaced the weights.
    They are not used, but kept, in an eager forward where ``conv1``'s weight or bias was modified in
    place (an optimizer step, ``copy_``) or replaced (``param.data = ...``, a deep copy, a
    ``functional_call`` with other tensors, forward-mode dual weights).

    Not seen, so never freeze a model that will still change this way: writes that bypass the
    weights' version counters while the model stays in eval mode without gradients (``p.data.copy_``,
    NumPy views, the storage), and, in a compiled or exported trace (which cannot read version
    counters), any in-place change after compiling. Blocks that do not take the sub-pixel path (scSE
    before ``conv1``, hooks, ``subpixel=False``) are left as they are."""
    return sum(m._freeze_subpixel() for m in model.modules() if isinstance(m, DecoderBlock))


def unfreeze_subpixel_weights(model: nn.Module) -> int:
    """Drop what :func:`freeze_subpixel_weights` stored; returns how many blocks were frozen."""
    return sum(m._unfreeze_subpixel() for m in model.modules() if isinstance(m, DecoderBlock))


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_pre_hooks or module._forward_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _global_hooks() -> bool:
    from torch.nn.modules import module

    return bool(module._global_forward_pre_hooks or module._global_forward_hooks or module._global_backward_hooks
                or module._global_backward_pre_hooks)


def _wants_gradient(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _has_tangent(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether a tensor is a forward-mode AD dual tensor (``torch.autograd.forward_ad.make_dual``): a
    frozen weight holds no tangent."""
    if forward_ad._current_level < 0:  # no dual level entered: nothing can carry a tangent
        return False
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _is_functorch(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether a tensor is wrapped by a torch.func transform (vmap, grad, jvp): those refuse memory-format
    queries and in-place copies of a batched tensor into an unbatched one."""
    return any(t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def upsample_conv3x3(x: torch.Tensor, skip: Optional[torch.Tensor], weight: torch.Tensor,
                     bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``conv2d(cat([interpolate(x, scale_factor=2, mode="nearest"), skip], 1), weight, bias, padding=1)``
    (``skip`` may be ``None``) without building the upsampled or the concatenated map.

    The weight splits by input channels, ``[w_up | w_skip]``, and the convolution into
    ``conv(up(x), w_up) + conv(skip, w_skip)``. Along each axis, a 3x3 convolution of a nearest-x2
    upsampled map reads at output row ``2i`` the low-resolution rows ``i-1, i, i`` (taps ``w0, w1+w2``)
    and at row ``2i+1`` the rows ``i, i, i+1`` (taps ``w0+w1, w2``): four 2x2 convolutions of ``x``, one
    per output phase, 16 multiply-adds per output pixel and input channel instead of 36. They run as
    one convolution with padding 1, whose ``(H+1) x (W+1)`` output holds phase ``(a, b)`` at offset
    ``(a, b)``; ordering the phases ``(1-a, 1-b)`` in its channels lines them up so that one
    ``pixel_shuffle`` and a one-pixel crop interleave them (under ``torch.compile`` and export; eager
    runs write each phase straight into its pixels). Exact up to float rounding (the summed taps)."""
    channels = x.shape[1]
    skip_channels = 0 if skip is None else skip.shape[1]
    if weight.dim() != 4 or weight.shape[1] != channels + skip_channels or weight.shape[2:] != (3, 3):
        raise ValueError(f"upsample_conv3x3: a 3x3 weight over {channels} + {skip_channels} input channels, "
                         f"got weight shape {tuple(weight.shape)}")
    phase_bias = _phase_bias(bias) if bias is not None and skip is None else None
    return _upsample_conv3x3_phases(x, skip, _subpixel_weight(weight[:, :channels]), phase_bias,
                                    weight[:, channels:], bias, weight.shape[0])


def _upsample_conv3x3_phases(x: torch.Tensor, skip: Optional[torch.Tensor], phase_weight: torch.Tensor,
                             phase_bias: Optional[torch.Tensor], skip_weight: Optional[torch.Tensor],
                             bias: Optional[torch.Tensor], out_channels: int) -> torch.Tensor:
    """:func:`upsample_conv3x3` from its derived weights (``phase_bias`` only without ``skip``)."""
    # frozen weights reach here unchecked: name the block's channels, not a derived weight's shape
    skip_channels = 0 if skip is None else skip.shape[1]
    want_skip = 0 if skip is None or skip_weight is None else skip_weight.shape[1]
    if x.shape[1] != phase_weight.shape[1] or skip_channels != want_skip:
        raise ValueError(f"upsample_conv3x3: inputs of {x.shape[1]} + {skip_channels} channels for a 3x3 weight over "
                         f"{phase_weight.shape[1]} + {want_skip} input channels")
    if skip is not None and skip.shape[2:] != (2 * x.shape[2], 2 * x.shape[3]):
        raise ValueError(f"upsample_conv3x3: skip features of size {tuple(skip.shape[2:])} for an input of "
                         f"{tuple(x.shape[2:])} (must be twice its size)")
    phases = F.conv2d(x, phase_weight, phase_bias, padding=1)  # (N, 4 O, H+1, W+1)
    functorch = not torch.compiler.is_compiling() and _is_functorch(x, skip, phase_weight, bias)
    if torch.compiler.is_compiling() or torch.compiler.is_exporting() or functorch:
        # functional ops that export (DepthToSpace, Slice, Add) and that inductor fuses into one pass
        out = F.pixel_shuffle(phases, 2)[:, :, 1:-1, 1:-1]
        if skip is None and functorch:
            return out.contiguous()
        if skip is None:
            # not a view: an in-place op after it (a folded block's ReLU) would export as ScatterND
            return out.contiguous(memory_format=_memory_format(phases))
        # comes with skip: upsample_conv3x3 slices it from its weight, and frozen weights apply only in a
        # block built with skip features, which stores it
        assert skip_weight is not None
        return F.conv2d(skip, skip_weight, bias, padding=1) + out
    # Eager: each phase is added into (or copied to) its pixels of the output once, with no interleaved
    # copy of the phases in between (1.1-1.5x less time than pixel_shuffle + add on a CPU).
    n, _, height, width = x.shape
    if skip is None:
        out = torch.empty((n, out_channels, 2 * height, 2 * width), dtype=phases.dtype, device=phases.device,
                          memory_format=_memory_format(phases))
    else:
        assert skip_weight is not None  # as above
        out = F.conv2d(skip, skip_weight, bias, padding=1)
    pixels = out.view(n, out_channels, height, 2, width, 2)
    phases = phases.view(n, out_channels, 2, 2, height + 1, width + 1)
    for a in (0, 1):
        for b in (0, 1):
            phase = phases[:, :, 1 - a, 1 - b, a:a + height, b:b + width]
            if skip is None:
                pixels[:, :, :, a, :, b].copy_(phase)
            else:
                pixels[:, :, :, a, :, b].add_(phase)
    return out


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format


def _phase_bias(bias: torch.Tensor) -> torch.Tensor:
    """(O,) -> (4 O,): each output channel's bias once per phase, in :func:`_subpixel_weight`'s order.
    Not ``bias.repeat_interleave(4)``: onnxscript before 0.7.2 cannot convert it (no ``dim``) or
    converts it to a graph onnx.checker refuses (``dim=0``), so an export of the U-Net failed."""
    return bias.reshape(-1, 1).expand(-1, 4).reshape(-1)


def _subpixel_weight(weight: torch.Tensor) -> torch.Tensor:
    """(O, C, 3, 3) -> (4 O, C, 2, 2): output channel ``4 o + 2 p + q`` holds the 2x2 taps of output
    phase ``(1 - p, 1 - q)`` (the order :func:`upsample_conv3x3`'s ``pixel_shuffle`` needs).

    One matrix product with the 0/1 tap map (element-wise sums and concatenations over the 3x3 taps
    took ten times as long on a CPU: copies with inner dimensions of 2 or 3); it writes the phases
    outermost, so putting them after the output channels moves contiguous blocks of ``4 C``."""
    out_channels, in_channels = weight.shape[:2]
    device = weight.device.type
    if torch.is_autocast_enabled(device):  # the taps are summed in the weight's precision, not autocast's
        with torch.autocast(device, enabled=False):
            return _subpixel_weight(weight)
    w = weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight
    phases = torch.matmul(w.reshape(1, out_channels * in_channels, 9), _phase_taps(w))  # (4, O C, 4)
    phases = phases.view(4, out_channels, 4 * in_channels).transpose(0, 1)
    return phases.reshape(4 * out_channels, in_channels, 2, 2).to(weight.dtype)


def _phase_taps(like: torch.Tensor) -> torch.Tensor:
    """The (4, 9, 4) 0/1 map ``[(p, q), (k, l), (i, j)]``: 3x3 tap ``(k, l)`` enters 2x2 tap ``(i, j)`` of
    phase ``(p, q)``. Built from ``eye`` on the weight's device: no host copy (CUDA graphs capture it)."""
    e = torch.eye(3, dtype=like.dtype, device=like.device)
    # rows (p, i) -> 3x3 taps k: p = 0 (output phase 1): (w0 + w1, w2); p = 1 (phase 0): (w0, w1 + w2)
    rows = torch.cat([e[0:1] + e[1:2], e[2:3], e[0:1], e[1:2] + e[2:3]]).view(2, 2, 3).transpose(1, 2)  # [p, k, i]
    taps = rows[:, None, :, None, :, None] * rows[None, :, None, :, None, :]  # [p, q, k, l, i, j]
    return taps.reshape(4, 9, 4)


def set_subpixel_decoding(model: nn.Module, enabled: bool) -> int:
    """Switch every :class:`DecoderBlock` in ``model`` to the sub-pixel path (``True``, the default) or
    to the reference "upsample, concatenate, convolve" path; returns how many blocks it set."""
    blocks = [m for m in model.modules() if isinstance(m, DecoderBlock)]
    for block in blocks:
        block.subpixel = bool(enabled)
    return len(blocks)


@contextlib.contextmanager
def subpixel_decoding(model: nn.Module, enabled: bool) -> Iterator[nn.Module]:
    """``with subpixel_decoding(model, False): ...`` runs ``model``'s decoder blocks on the reference
    path inside the block, and restores each block's setting after it."""
    before = [(m, m.subpixel) for m in model.modules() if isinstance(m, DecoderBlock)]
    set_subpixel_decoding(model, enabled)
    try:
        yield model
    finally:
        for block, value in before:
            block.subpixel = value


def _drop_unused_attention1(module, state_dict, prefix, *args):
    # load_state_dict pre-hook: (module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
    for key in [k for k in state_dict if k.startswith(prefix + "attention1.")]:
        del state_dict[key]


def initialize_decoder(module: nn.Module) -> None:
    """smp's decoder init: Kaiming-uniform (fan in, ReLU) convolutions, unit BatchNorm."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_uniform_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def initialize_head(module: nn.Module) -> None:
    """smp's head init: Xavier-uniform weights, zero bias."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
