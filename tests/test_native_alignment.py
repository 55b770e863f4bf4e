"""Misaligned arrays (found by the CPU kernels' AddressSanitizer + UBSan run, benchmarks/cpu_sanitize.sh).

np.frombuffer(..., offset=1) and torch.frombuffer(..., offset=1) give float arrays whose address is
not a multiple of their item size. The kernels read them through typed pointers, which is undefined
behaviour (UBSan: "load of misaligned address ... for type 'const float'"; a vectorised loop may
assume alignment). The Python bridge now hands the kernels an aligned copy, and the native view
refuses a misaligned address outright."""

from __future__ import annotations

import numpy as np
import pytest

from pneumoseg import _native, postprocess, rle
from pneumoseg.errors import InvalidInputError


def _mask() -> np.ndarray:
    return (np.random.default_rng(0).random((6, 7)) > 0.5).astype(np.float32)


def _misaligned_numpy(values: np.ndarray) -> np.ndarray:
    x = np.frombuffer(b"x" + values.tobytes(), values.dtype, offset=1).reshape(values.shape)
    assert not x.flags.aligned
    return x


def test_a_misaligned_numpy_array_reaches_the_kernels_as_an_aligned_copy():
    m = _mask()
    x = _misaligned_numpy(m)
    info = _native.as_view(x, "mask")
    assert info.owner.__array_interface__["data"][0] % x.itemsize == 0
    np.testing.assert_array_equal(info.owner, m)
    assert rle.encode(x) == rle.encode(m)
    np.testing.assert_array_equal(postprocess.label_components(x)[0], postprocess.label_components(m)[0])


def test_a_misaligned_torch_tensor_reaches_the_kernels_as_an_aligned_copy():
    torch = pytest.importorskip("torch")
    m = _mask()
    t = torch.frombuffer(bytearray(b"x" + m.tobytes()), dtype=torch.float32, offset=1).reshape(6, 7)
    assert t.data_ptr() % 4 != 0
    info = _native.as_view(t, "mask")
    assert info.owner.data_ptr() % 4 == 0
    assert torch.equal(info.owner, torch.from_numpy(m))
    assert rle.encode(t) == rle.encode(m)


def test_the_native_view_refuses_a_misaligned_address():
    # The last line of defence for callers that build views from raw addresses (the loss passes
    # torch data pointers straight to the core).
    m = np.zeros(8, np.float32)
    address = m.__array_interface__["data"][0]
    _native._C.TensorView(address, 11, 0, 0, [4], [1])  # aligned: accepted
    with pytest.raises(InvalidInputError, match="not aligned"):
        _native._C.TensorView(address + 1, 11, 0, 0, [4], [1])
    _native._C.TensorView(address + 1, 2, 0, 0, [4], [1])  # uint8 has no alignment to keep


def test_the_loss_reads_misaligned_tensors_through_an_aligned_copy():
    # combo_loss hands torch data pointers to the core itself: a misaligned logits or target (or
    # both) was the native view's "not aligned" error; it now equals the loss of aligned copies,
    # gradient included
    torch = pytest.importorskip("torch")
    from pneumoseg.losses import combo_loss

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 5, 7, generator=gen)
    target = (torch.rand(2, 1, 5, 7, generator=gen) > 0.5).float()

    def misaligned(t):
        out = torch.frombuffer(bytearray(b"x" + t.numpy().tobytes()), dtype=t.dtype, offset=1).reshape(t.shape)
        assert out.data_ptr() % t.element_size() != 0
        return out

    reference = logits.clone().requires_grad_(True)
    expected = combo_loss(reference, target, focal_weight=1.0)
    expected.backward()
    for x, t in ((misaligned(logits), target), (logits.clone(), misaligned(target)),
                 (misaligned(logits), misaligned(target))):
        x.requires_grad_(True)
        loss = combo_loss(x, t, focal_weight=1.0)
        loss.backward()
        assert torch.equal(loss, expected)
        assert torch.equal(x.grad, reference.grad)
