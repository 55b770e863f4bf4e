"""Models of the CUDA labelling (csrc/postprocess/components_cuda.cu), run on the CPU and checked against
scipy, because the kernels' logic can be wrong in ways only some inputs show and no GPU is needed to
find them. Keep them in step with the kernels.

- The tile pass (local_kernel) under random interleavings: run-start initialisation by warp ballot,
  the run rule's unions by atomicMin with retry and path halving in shared memory, finds with halving
  by each run's first pixel only, areas added per run. Every shared-memory read, plain store and
  atomicMin of the block's 256 threads is one step and the threads are stepped in random order, so the
  test explores interleavings the GPU may produce (under sequential consistency; compute-sanitizer's
  racecheck covers the rest on a GPU).
- The three passes over whole images of several tiles (tile pass, border pass with the run rule on
  each tile's top row, resolve): labels and areas as scipy's.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

ndi = pytest.importorskip("scipy.ndimage")

K, ROWS_PER_PASS = 32, 8  # kTile, kRowsPerPass


def bit(bits: int, i: int) -> bool:
    return 0 <= i < K and bool((bits >> i) & 1)


def run_start_of(bits: int, tx: int) -> int:
    zeros_below = ~bits & ((1 << tx) - 1) & 0xFFFFFFFF
    return zeros_below.bit_length() if zeros_below else 0  # 32 - clz(zeros_below)


def run_length_from(bits: int, s: int) -> int:
    rest = (~bits & 0xFFFFFFFF) >> s
    return K - s if rest == 0 else (rest & -rest).bit_length() - 1  # __ffs(rest) - 1


def run_unions(above: int, run_first: bool, left_exists: bool, right_exists: bool, tx: int, conn: int,
               above_left: bool, above_right: bool) -> int:
    """components_cuda.cu's run_unions: 1 = up-left, 2 = up, 4 = up-right."""
    up = bit(above, tx)
    if conn == 4:
        return 2 if up and (run_first or not above_left) else 0
    which = 0
    if run_first:
        if left_exists and above_left:
            which |= 1
        elif up:
            which |= 2
    if right_exists and above_right and not up:
        which |= 4
    return which


# ---- the tile pass, stepped ------------------------------------------------------------------------

def find_halving(x):
    up = yield ("r", x)
    while up != x:
        grand = yield ("r", up)
        if grand == up:
            return up
        yield ("w", x, grand)
        x = grand
        up = yield ("r", x)
    return x


def unite(a, b):
    while True:
        a = yield from find_halving(a)
        b = yield from find_halving(b)
        if a == b:
            return
        if a > b:
            a, b = b, a
        old = yield ("min", b, a)
        if old == b:
            return
        b = old


def union_thread(row_bits, ty, tx, conn):
    for j in range(K // ROWS_PER_PASS):
        lr = ty + j * ROWS_PER_PASS
        li = lr * K + tx
        if lr == 0:
            continue
        bits, up_bits = row_bits[lr], row_bits[lr - 1]
        if not bit(bits, tx):
            continue
        which = run_unions(up_bits, not bit(bits, tx - 1), tx > 0, tx + 1 < K, tx, conn,
                           bit(up_bits, tx - 1), bit(up_bits, tx + 1))
        if which & 1:
            yield from unite(li, li - K - 1)
        if which & 2:
            yield from unite(li, li - K)
        if which & 4:
            yield from unite(li, li - K + 1)


def find_thread(row_bits, ty, tx, run_roots, area):
    for j in range(K // ROWS_PER_PASS):
        lr = ty + j * ROWS_PER_PASS
        bits = row_bits[lr]
        if bit(bits, tx) and run_start_of(bits, tx) == tx:
            root = yield from find_halving(lr * K + tx)
            run_roots[lr * K + tx] = root
            area[root] = area.get(root, 0) + run_length_from(bits, tx)  # atomicAdd: order-free


def run(p, gens, rng):
    live = [[g, None] for g in gens]
    while live:
        i = rng.randrange(len(live))
        g, send = live[i]
        try:
            op = g.send(send)
        except StopIteration:
            live.pop(i)
            continue
        if op[0] == "r":
            live[i][1] = p[op[1]]
        elif op[0] == "w":
            p[op[1]] = op[2]
            live[i][1] = None
        else:  # atomicMin
            old = p[op[1]]
            p[op[1]] = min(old, op[2])
            live[i][1] = old


def row_bits_of(mask: np.ndarray) -> list[int]:
    h, w = mask.shape
    return [sum(1 << tx for tx in range(K) if lr < h and tx < w and mask[lr, tx]) for lr in range(K)]


def tile_pass(mask: np.ndarray, conn: int, rng: random.Random | None):
    """(tile-local root index per pixel, -1 off; area per root) of one tile, stepped in random order
    when `rng` is given, else thread by thread."""
    h, w = mask.shape
    row_bits = row_bits_of(mask)
    p = [-1] * (K * K)
    for lr in range(K):
        for tx in range(K):
            if bit(row_bits[lr], tx):
                p[lr * K + tx] = lr * K + run_start_of(row_bits[lr], tx)
    threads = [(ty, tx) for ty in range(ROWS_PER_PASS) for tx in range(K)]
    rng = rng or random.Random(0)
    run(p, [union_thread(row_bits, ty, tx, conn) for ty, tx in threads], rng)
    run_roots, area = {}, {}
    run(p, [find_thread(row_bits, ty, tx, run_roots, area) for ty, tx in threads], rng)
    roots = np.full((K, K), -1)
    for lr in range(K):  # the shuffle: each pixel takes its run's root
        for tx in range(K):
            if bit(row_bits[lr], tx):
                roots[lr, tx] = run_roots[lr * K + run_start_of(row_bits[lr], tx)]
    return roots[:h, :w], area


def structure(conn):
    return ndi.generate_binary_structure(2, 1 if conn == 4 else 2)


@pytest.mark.parametrize("seed", range(6))
def test_tile_pass_gives_scipys_components_roots_and_areas(seed):
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    for _ in range(12):
        h, w = (int(v) for v in nrng.integers(1, K + 1, 2))
        mask = nrng.random((h, w)) < float(nrng.choice([0.3, 0.5, 0.6, 0.8, 1.0]))
        conn = int(nrng.choice([4, 8]))
        roots, area = tile_pass(mask, conn, rng)
        lab, n = ndi.label(mask, structure(conn))
        assert len(area) == n
        for c in range(1, n + 1):
            ys, xs = np.nonzero(lab == c)
            # one root per component, at its first pixel in raster order (the kernel's numbering rule)
            first = int(ys[0]) * K + int(xs[0])
            assert set(roots[ys, xs].tolist()) == {first}
            assert area[first] == len(ys)
        assert (roots[~mask] == -1).all()


# Shapes where the run rule has most to get wrong: runs that touch several runs above, runs above
# that touch several runs below, diagonal-only contacts, combs and staircases.
def _comb(h, w):
    m = np.zeros((h, w), bool)
    m[0, :] = True
    m[1:, ::2] = True
    return m


SHAPES = {
    "comb": _comb(K, K),
    "inverted comb": _comb(K, K)[::-1],
    "diagonal stairs": np.eye(K, dtype=bool) | np.eye(K, k=3, dtype=bool),
    "anti-diagonal": np.fliplr(np.eye(K, dtype=bool)),
    "checkerboard": (np.add.outer(np.arange(K), np.arange(K)) % 2).astype(bool),
    "full": np.ones((K, K), bool),
    "last pixel": np.pad(np.ones((1, 1), bool), ((K - 1, 0), (K - 1, 0))),
}


@pytest.mark.parametrize("conn", [4, 8])
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_tile_pass_on_hard_shapes(name, conn):
    mask = SHAPES[name]
    roots, area = tile_pass(mask, conn, random.Random(1))
    lab, n = ndi.label(mask, structure(conn))
    for c in range(1, n + 1):
        ys, xs = np.nonzero(lab == c)
        first = int(ys[0]) * K + int(xs[0])
        assert set(roots[ys, xs].tolist()) == {first} and area[first] == len(ys)


# ---- the three passes over a whole image, sequentially -------------------------------------------

def seq_find(p, x):
    while p[x] != x:
        p[x] = p[p[x]]  # halving
        x = p[x]
    return x


def seq_unite(p, a, b):
    a, b = seq_find(p, a), seq_find(p, b)
    if a != b:
        p[max(a, b)] = min(a, b)


def image_model(mask: np.ndarray, conn: int, rng: random.Random):
    """Labels (scipy's numbering) and areas from the model of local, border and resolve kernels."""
    h, w = mask.shape
    p = np.full(h * w, -1, np.int64)
    tile_area = np.zeros(h * w, np.int64)
    tiles = [(r0, c0) for r0 in range(0, h, K) for c0 in range(0, w, K)]
    for r0, c0 in tiles:  # pass 1
        roots, area = tile_pass(mask[r0:r0 + K, c0:c0 + K], conn, None)
        th, tw = roots.shape
        for lr in range(th):
            for lc in range(tw):
                if roots[lr, lc] >= 0:
                    root = int(roots[lr, lc])
                    p[(r0 + lr) * w + c0 + lc] = (r0 + root // K) * w + c0 + root % K
        for root, a in area.items():
            tile_area[(r0 + root // K) * w + c0 + root % K] = a
    # pass 2: the border kernel's unions, in random order across tiles
    unions = []
    for r0, c0 in tiles:
        if r0 > 0:
            k0 = r0 * w
            bits = sum(1 << tx for tx in range(K) if c0 + tx < w and p[k0 + c0 + tx] >= 0)
            up_bits = sum(1 << tx for tx in range(K) if c0 + tx < w and p[k0 - w + c0 + tx] >= 0)
            for tx in range(K):
                c = c0 + tx
                if not bit(bits, tx):
                    continue
                k, up = k0 + c, k0 - w + c
                above_left = bit(up_bits, tx - 1) if tx > 0 else c > 0 and p[up - 1] >= 0
                above_right = bit(up_bits, tx + 1) if tx + 1 < K else c + 1 < w and p[up + 1] >= 0
                which = run_unions(up_bits, not bit(bits, tx - 1), c > 0, c + 1 < w, tx, conn,
                                   above_left, above_right)
                unions += [(k, up - 1)] * bool(which & 1) + [(k, up)] * bool(which & 2) + [(k, up + 1)] * bool(which & 4)
        for tx, edge in ((0, "left"), (K - 1, "right")):
            c = c0 + tx
            if not (c < w and ((edge == "left" and c > 0) or (edge == "right" and c + 1 < w))):
                continue
            for lr in range(min(K, h - r0)):
                k = (r0 + lr) * w + c
                if p[k] < 0:
                    continue
                if edge == "left" and p[k - 1] >= 0:
                    unions.append((k, k - 1))
                if conn == 8 and lr > 0:
                    d = k - w - 1 if edge == "left" else k - w + 1
                    if p[d] >= 0:
                        unions.append((k, d))
    rng.shuffle(unions)
    for a, b in unions:
        seq_unite(p, a, b)
    # pass 3: tile roots point at their final root and add their area there
    final_area = tile_area.copy()
    is_root = np.zeros(h * w, bool)
    for k in np.nonzero(tile_area > 0)[0]:
        root = seq_find(p, int(k))
        if root == k:
            is_root[k] = True
        else:
            p[k] = root
            final_area[root] += tile_area[k]
    rank = np.cumsum(is_root) - is_root
    labels = np.zeros(h * w, np.int64)
    on = p >= 0
    labels[on] = rank[p[p[on]]] + 1
    return labels.reshape(h, w), final_area[is_root]


@pytest.mark.parametrize("seed", range(8))
def test_three_passes_give_scipys_labels_and_areas(seed):
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    for _ in range(3):
        h, w = (int(v) for v in nrng.integers(1, 3 * K + 5, 2))
        kind = nrng.integers(3)
        if kind == 0:
            mask = nrng.random((h, w)) < float(nrng.choice([0.3, 0.5, 0.6, 0.8, 1.0]))
        elif kind == 1:  # blobs and snakes across tile borders
            mask = ndi.binary_dilation(nrng.random((h, w)) < 0.02, iterations=int(nrng.integers(1, 5)))
        else:  # combs and stairs over the whole image
            yy, xx = np.mgrid[:h, :w]
            mask = ((xx % 3 == 0) | (yy % int(nrng.integers(5, 40)) == 0)) ^ ((xx + yy) % 7 == 0)
        conn = int(nrng.choice([4, 8]))
        labels, areas = image_model(mask, conn, rng)
        ref, n = ndi.label(mask, structure(conn))
        np.testing.assert_array_equal(labels, ref)
        np.testing.assert_array_equal(areas, np.bincount(ref.ravel(), minlength=n + 1)[1:])


def _pixels(*points, shape=(2 * K + 3, 2 * K + 3)):
    m = np.zeros(shape, bool)
    for y, x in points:
        m[y, x] = True
    return m


# Contacts that only a tile border sees: diagonals through a tile corner (both ways), up/down and
# left/right pairs on the edges, at every corner of a tile.
BORDER_CASES = {
    "corner diagonal": _pixels((K - 1, K - 1), (K, K)),
    "corner anti-diagonal": _pixels((K - 1, K), (K, K - 1)),
    "top edge, first column": _pixels((K - 1, K), (K, K)),
    "top edge, last column": _pixels((K - 1, 2 * K - 1), (K, 2 * K - 1)),
    "left edge, top row": _pixels((K, K - 1), (K, K)),
    "left edge, diagonal below the top row": _pixels((K, K - 1), (K + 1, K)),
    "right edge, diagonal below the top row": _pixels((K, K), (K + 1, K - 1)),
    "last pixel and its diagonal": _pixels((2 * K + 1, 2 * K + 1), (2 * K + 2, 2 * K + 2)),
}


@pytest.mark.parametrize("conn", [4, 8])
@pytest.mark.parametrize("name", sorted(BORDER_CASES))
def test_three_passes_join_contacts_across_tile_borders(name, conn):
    mask = BORDER_CASES[name]
    labels, areas = image_model(mask, conn, random.Random(0))
    ref, n = ndi.label(mask, structure(conn))
    np.testing.assert_array_equal(labels, ref)
    np.testing.assert_array_equal(areas, np.bincount(ref.ravel(), minlength=n + 1)[1:])
