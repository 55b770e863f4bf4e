"""Grid search for the SIIM-ACR winners' "triplet" post-processing (``pneumoseg.postprocess.triplet_threshold``):
an image is positive only if at least ``min_area`` of its pixels have probability above ``top``; a
positive image's mask is ``probs > bottom``, a negative one is empty. Optionally a classifier gates
first: an image whose score is below ``gate_threshold`` is negative whatever its pixels say.

The search does not threshold the batch once per grid point. Per image it keeps a few counts: the
truth's area, and for every distinct threshold ``u`` in ``tops`` and ``bottoms`` the pixels above
``u`` and (for ``bottoms``) those of them inside the truth. Every grid point's Kaggle Dice then follows
from these counts by arithmetic: the per-image Dice of a positive image at each bottom, of a negative
image (1 if its truth is empty, else 0), and which images each (gate, top, min_area) makes positive; the
whole grid is one small matrix product. The pixel work is ``len(set(tops) | set(bottoms))`` threshold
passes over each image, whatever the grid's size.

``TripletSearch`` accumulates the counts batch by batch (a validation loop need not keep every
probability map: the counts are a few integers per image), and on CUDA without synchronising until
``result()``; ``best_triplet`` is the one-call form.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import InvalidInputError
from ._inputs import check_count, check_real, check_unit, mask_pair, score_vector, threshold_below, torch_module

__all__ = ["TripletSearch", "TripletChoice", "best_triplet", "DEFAULT_TOPS", "DEFAULT_BOTTOMS",
           "DEFAULT_MIN_AREAS_1024", "DEFAULT_GATE_THRESHOLDS"]

DEFAULT_TOPS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.9)
DEFAULT_BOTTOMS = (0.2, 0.3, 0.4, 0.5)
# Pixel counts for 1024 x 1024 images (the winners used 800 to 3000 there); scaled by image area.
DEFAULT_MIN_AREAS_1024 = (0, 250, 500, 1000, 2000, 3000, 4000)
DEFAULT_GATE_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)


@dataclass(frozen=True, eq=False)  # eq would compare the score arrays elementwise
class TripletChoice:
    """The best grid point and the whole grid's scores.

    ``scores`` is indexed ``[gate, top, min_area, bottom]`` in the order the grids were given (without
    gating, ``[top, min_area, bottom]``). Among equal best scores the first in that order wins.
    """

    top: float
    min_area: int
    bottom: float
    gate_threshold: Optional[float]
    score: float  # the Kaggle Dice (mean per-image Dice) at the best point
    scores: np.ndarray = field(repr=False)
    tops: tuple[float, ...] = field(repr=False)
    min_areas: tuple[int, ...] = field(repr=False)
    bottoms: tuple[float, ...] = field(repr=False)
    gate_thresholds: Optional[tuple[float, ...]] = field(repr=False)
    images: int = field(repr=False)

    def postprocess_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``pneumoseg.postprocess.postprocess`` that apply this choice."""
        kwargs: dict[str, Any] = {"top": self.top, "min_area": self.min_area, "bottom": self.bottom}
        if self.gate_threshold is not None:
            kwargs["gate_threshold"] = self.gate_threshold
        return kwargs


def _grid(values: Any, name: str, check) -> tuple:
    try:
        values = tuple(values)
    except TypeError:
        raise InvalidInputError(f"{name} must be a sequence of values, got {values!r}") from None
    if not values:
        raise InvalidInputError(f"{name} is empty: the grid needs at least one value")
    return tuple(check(v, f"{name} value") for v in values)


def _scaled_min_areas(pixels: int) -> tuple[int, ...]:
    scaled = (int(round(a * pixels / (1024 * 1024))) for a in DEFAULT_MIN_AREAS_1024)
    return tuple(dict.fromkeys(scaled))  # drop duplicates, keep the order


class TripletSearch:
    """Accumulate per-image counts over batches, then find the best (gate, top, min_area, bottom).

    ``min_areas=None`` scales ``DEFAULT_MIN_AREAS_1024`` to the first batch's image area. Gating is on
    when ``gate_thresholds`` is given, or when the first batch comes with ``gate_scores`` (then
    ``DEFAULT_GATE_THRESHOLDS``); every batch must then have its scores (``score >= gate_threshold``
    keeps an image, as ``pneumoseg.postprocess.gate``).
    """

    def __init__(
        self,
        tops: Sequence[float] = DEFAULT_TOPS,
        min_areas: Optional[Sequence[int]] = None,
        bottoms: Sequence[float] = DEFAULT_BOTTOMS,
        gate_thresholds: Optional[Sequence[float]] = None,
    ):
        self.tops = _grid(tops, "tops", check_unit)
        self.bottoms = _grid(bottoms, "bottoms", check_unit)
        self._given_min_areas = None if min_areas is None else _grid(min_areas, "min_areas", check_count)
        self._given_gates = None if gate_thresholds is None else _grid(gate_thresholds, "gate_thresholds", check_real)
        # Every distinct threshold once; tops and bottoms index into it.
        self._cuts = tuple(sorted(set(self.tops) | set(self.bottoms)))
        self._top_index = np.array([self._cuts.index(t) for t in self.tops])
        self._bottom_cuts = tuple(sorted(set(self.bottoms)))
        self._bottom_index = np.array([self._bottom_cuts.index(b) for b in self.bottoms])
        self.reset()

    def reset(self) -> None:
        self._above: list[Any] = []  # (n, len(cuts)) pixels above each threshold
        self._inside: list[Any] = []  # (n, len(bottom_cuts)) of them inside the truth
        self._truth_area: list[Any] = []
        self._nan: list[Any] = []  # CUDA only: per-image "probs holds NaN", checked in result()
        self._bad_truth: list[Any] = []  # CUDA only: per-image "float truth not 0/1", checked in result()
        self._gate_scores: list[Any] = []
        # Both may still be settled by the first batch (its image area, whether it brings scores).
        self.min_areas: Optional[tuple[int, ...]] = self._given_min_areas
        self.gate_thresholds: Optional[tuple[float, ...]] = self._given_gates
        self._gated: Optional[bool] = None if self._given_gates is None else True

    def update(self, probs: Any, truths: Any, gate_scores: Any = None) -> None:
        """Add a batch: probabilities and truth masks as the Dice metrics take them ((H, W),
        (N, H, W) or (N, 1, H, W); NumPy or torch, CPU or CUDA), and optionally the classifier's
        per-image scores. NaN probabilities and a float truth holding values other than 0 and 1 are
        errors, as in the Dice metrics (on CUDA, reported by ``result()``)."""
        pair = mask_pair(probs, truths)
        dtype = pair.pred.dtype
        if not (dtype.kind == "f" if isinstance(dtype, np.dtype) else dtype.is_floating_point):
            raise InvalidInputError(f"probs must hold floating-point probabilities, got dtype {dtype}")
        n = pair.pred.shape[0]
        if self.min_areas is None:
            self.min_areas = _scaled_min_areas(pair.pred.shape[1] * pair.pred.shape[2])
        if self._gated is None:
            self._gated = gate_scores is not None
            if self._gated:
                self.gate_thresholds = DEFAULT_GATE_THRESHOLDS
        if self._gated != (gate_scores is not None):
            raise InvalidInputError(
                "gate_scores must be given with every batch when gating is on, and never when it is off"
                if self._gated else "gate_scores given, but this search was started without gating"
            )
        if self._gated:
            self._gate_scores.append(self._scores(gate_scores, n, pair.cuda))
        counts = self._torch_counts(pair) if pair.cuda else self._numpy_counts(pair)
        self._above.append(counts[0])
        self._inside.append(counts[1])
        self._truth_area.append(counts[2])

    @staticmethod
    def _scores(gate_scores: Any, n: int, cuda: bool) -> Any:
        torch = torch_module()
        if cuda and torch is not None and isinstance(gate_scores, torch.Tensor) and gate_scores.is_cuda:
            s = gate_scores.detach().reshape(-1).double()  # checked for NaN in result(): no sync here
        else:
            s = score_vector(gate_scores, "gate_scores")
        if s.shape[0] != n:
            raise InvalidInputError(f"gate_scores has {s.shape[0]} values for a batch of {n} images")
        return s

    def _numpy_counts(self, pair) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        probs, truths = pair.pred, pair.truth
        n = probs.shape[0]
        cuts = [threshold_below(u, probs.dtype) for u in self._cuts]
        bottom_cuts = [threshold_below(u, probs.dtype) for u in self._bottom_cuts]
        above = np.zeros((n, len(cuts)), np.int64)
        inside = np.zeros((n, len(bottom_cuts)), np.int64)
        truth_area = np.zeros(n, np.int64)
        scratch = np.empty(probs.shape[1:], bool)
        for i in range(n):
            p, t = probs[i], truths[i]
            if np.isnan(p).any():
                raise InvalidInputError(f"probs image {i} of this batch holds NaN")
            for k, cut in enumerate(cuts):
                above[i, k] = np.count_nonzero(np.greater(p, cut, out=scratch))
            truth_area[i] = np.count_nonzero(t)
            # A float truth of 0.5s (a bilinearly resized mask, say) would count as foreground and
            # silently move the chosen thresholds; kaggle_dice refuses it, so the search does too.
            if t.dtype.kind == "f" and truth_area[i] != np.count_nonzero(t == 1):
                raise InvalidInputError(f"truths image {i} of this batch holds values other than 0 and 1; "
                                        "a truth mask must be binary")
            if truth_area[i]:
                # The truth is small: gather its pixels once, then count each bottom over them only.
                p_inside = p[t != 0]
                for k, cut in enumerate(bottom_cuts):
                    inside[i, k] = np.count_nonzero(p_inside > cut)
        return above, inside, truth_area

    def _torch_counts(self, pair) -> tuple[Any, Any, Any]:
        torch = torch_module()
        probs, truths = pair.pred, pair.truth
        n = probs.shape[0]
        np_dtype = np.dtype(str(probs.dtype).replace("torch.", ""))
        probs = probs.reshape(n, -1)
        truths = truths.reshape(n, -1)
        truth = truths != 0
        if truths.is_floating_point():
            self._bad_truth.append((truth & (truths != 1)).any(1))
        above = torch.stack([(probs > float(threshold_below(u, np_dtype))).sum(1) for u in self._cuts], 1)
        inside = torch.stack(
            [((probs > float(threshold_below(u, np_dtype))) & truth).sum(1) for u in self._bottom_cuts], 1
        )
        self._nan.append(torch.isnan(probs).any(1))
        return above, inside, truth.sum(1)

    def result(self) -> TripletChoice:
        """The best grid point over every image added so far (one host synchronisation on CUDA)."""
        if not self._above:
            raise InvalidInputError("no images were added: call update() with a batch first")
        min_areas_grid = self.min_areas
        assert min_areas_grid is not None  # update() settles it before it adds a batch

        def host(parts: list[Any]) -> np.ndarray:
            return np.concatenate([p.cpu().numpy() if hasattr(p, "cpu") else np.asarray(p) for p in parts])

        nan = host(self._nan) if self._nan else np.zeros(0, bool)
        if nan.any():
            raise InvalidInputError(f"probs holds NaN in {int(nan.sum())} images")
        bad_truth = host(self._bad_truth) if self._bad_truth else np.zeros(0, bool)
        if bad_truth.any():
            raise InvalidInputError(f"truths holds values other than 0 and 1 in {int(bad_truth.sum())} images; "
                                    "a truth mask must be binary")
        above, inside, truth_area = host(self._above), host(self._inside), host(self._truth_area)
        n = truth_area.shape[0]
        if n == 0:
            raise InvalidInputError("no images were added (every batch was empty)")

        # Per-image Dice of a positive image at each bottom, and of a negative (empty) prediction.
        pred_area = above[:, [self._cuts.index(b) for b in self.bottoms]]
        inter = inside[:, self._bottom_index]
        denom = pred_area + truth_area[:, None]
        dice_positive = np.ones(denom.shape, np.float64)
        np.divide(2.0 * inter, denom, out=dice_positive, where=denom != 0)
        dice_negative = (truth_area == 0).astype(np.float64)

        min_areas = np.array(min_areas_grid, np.int64)
        positive = above[:, self._top_index][:, :, None] >= min_areas[None, None, :]  # (n, top, area)
        if self._gated:
            scores = host(self._gate_scores).astype(np.float64)
            if not np.isfinite(scores).all():
                raise InvalidInputError("gate_scores holds NaN or infinite values")
            keep = scores[:, None] >= np.array(self.gate_thresholds)[None, :]  # (n, gate)
            positive = keep[:, :, None, None] & positive[:, None]
        grid_shape = positive.shape[1:] + (len(self.bottoms),)
        gain = dice_positive - dice_negative[:, None]
        totals = dice_negative.sum() + positive.reshape(n, -1).T.astype(np.float64) @ gain
        grid = (totals / n).reshape(grid_shape)

        best = np.unravel_index(int(np.argmax(grid)), grid.shape)
        gate = None
        if self._gated:
            assert self.gate_thresholds is not None  # settled with _gated by update()
            gate, best = self.gate_thresholds[best[0]], best[1:]
        return TripletChoice(
            top=self.tops[best[0]], min_area=min_areas_grid[best[1]], bottom=self.bottoms[best[2]],
            gate_threshold=gate, score=float(grid.max()), scores=grid, tops=self.tops,
            min_areas=min_areas_grid, bottoms=self.bottoms,
            gate_thresholds=self.gate_thresholds if self._gated else None, images=n,
        )


def best_triplet(
    probs: Any,
    truths: Any,
    *,
    tops: Sequence[float] = DEFAULT_TOPS,
    min_areas: Optional[Sequence[int]] = None,
    bottoms: Sequence[float] = DEFAULT_BOTTOMS,
    gate_scores: Any = None,
    gate_thresholds: Optional[Sequence[float]] = None,
) -> TripletChoice:
    """The (top, min_area, bottom) — and, with ``gate_scores``, the gate threshold — that maximise the
    Kaggle Dice of ``triplet_threshold(probs, top, min_area, bottom)`` (after ``gate``) against
    ``truths``. See ``TripletSearch`` for the grids' defaults and ``TripletChoice`` for the answer."""
    search = TripletSearch(tops, min_areas, bottoms, gate_thresholds)
    search.update(probs, truths, gate_scores)
    return search.result()
