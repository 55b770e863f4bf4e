"""The training engine's optimisation math against independent computations on a tiny synthetic set
(CPU, a few optimizer steps): gradient accumulation and clipping, the EMA of the weights, the
learning rate each step uses and the one logged, stage initialisation from the previous stage's
best epoch, the best-k checkpoints, the positive-ratio sampler's epochs, and resuming an interrupted
run with all of these on."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("yaml")

from factories import TINY_DETERMINISTIC_TRAINING as TINY, training_config
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from pneumoseg.data import make_synthetic_siim
from pneumoseg.train import engine
from pneumoseg.train.engine import train


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("math-synth")
    make_synthetic_siim(root, n_images=20, size=96, positive_fraction=0.4, seed=3)
    return root


def _run(root, out, **changes) -> engine.TrainResult:
    return train(training_config(TINY, root, **changes), out, progress=False)


def _weights(result) -> dict:
    return {k: v.detach().double().clone() for k, v in result.model.state_dict().items()}


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a if a[k].is_floating_point())


class _Recorder:
    """Optimizer step hooks (global, removed on exit): the rate each step uses, and a callback after it."""

    def __init__(self, after=None) -> None:
        self.lrs: list[float] = []
        self.after = after

    def __enter__(self):
        self._pre = register_optimizer_step_pre_hook(lambda opt, a, k: self.lrs.append(opt.param_groups[0]["lr"]))
        self._post = register_optimizer_step_post_hook(lambda opt, a, k: self.after and self.after())
        return self

    def __exit__(self, *exc) -> None:
        self._pre.remove()
        self._post.remove()


def test_accumulated_step_equals_one_clipped_step_on_the_whole_batch(synth, tmp_path):
    # per-image Dice and frozen BatchNorm make the loss a mean over images, so 2 micro-batches of 2
    # with the loss scaled by 1/2 must give the gradient of one batch of 4; the norm clip (0.01,
    # far below the gradient's norm) acts once, on the accumulated gradient
    base = dict(model__batchnorm="frozen", loss__per_image_dice=True, clip_grad_norm=0.01)
    start = _weights(_run(synth, tmp_path / "start", **base, optimizer__lr=1e-30))
    whole = _run(synth, tmp_path / "whole", **base, batch_size=4, accumulate=1)
    micro = _run(synth, tmp_path / "micro", **base, batch_size=2, accumulate=2)
    assert whole.steps == micro.steps == 2
    moved = _max_diff(_weights(whole), start)
    assert moved > 1e-4
    assert _max_diff(_weights(whole), _weights(micro)) < 1e-3 * moved


def test_ema_is_the_documented_average_of_the_stepped_weights(synth, tmp_path, monkeypatch):
    held = {}
    built = engine.ModelEMA.__init__

    def hold(self, model, decay):  # the network the EMA starts from and follows
        held["model"], held["start"] = model, {k: v.detach().double().clone() for k, v in model.state_dict().items()}
        built(self, model, decay)

    monkeypatch.setattr(engine.ModelEMA, "__init__", hold)
    after: list[dict] = []
    with _Recorder(lambda: after.append({k: v.detach().double().clone()
                                          for k, v in held["model"].state_dict().items()})):
        result = _run(synth, tmp_path / "ema", ema=0.7, epochs=2, batch_size=2, optimizer__name="adam",
                      optimizer__lr=1e-2)
    assert result.steps == len(after) == 8
    average = held["start"]
    for n, weights in enumerate(after[:4 * result.metrics["best_epoch"]], start=1):
        d = min(0.7, (1 + n) / (10 + n))  # the warm-up of the decay
        average = {k: w if "num_batches_tracked" in k else d * average[k] + (1 - d) * w for k, w in weights.items()}
    saved = _weights(result)
    assert _max_diff(saved, average) < 1e-5  # BatchNorm running statistics averaged too
    assert _max_diff(saved, after[4 * result.metrics["best_epoch"] - 1]) > 1e-2  # and not the raw weights


def test_each_schedule_steps_as_documented_and_the_logged_rate_is_the_one_used(synth, tmp_path):
    stages = [
        {"name": "plateau", "epochs": 3, "lr": 1e-2,
         "scheduler": {"name": "plateau", "patience": 0, "factor": 0.5, "threshold": 1e-7, "min_lr": 1e-7}},
        {"name": "cosine", "epochs": 3, "lr": 1e-3, "scheduler": {"name": "cosine", "t_max": 2, "eta_min": 1e-5}},
        {"name": "onecycle", "epochs": 2, "lr": 4e-3, "scheduler": {"name": "onecycle", "warmup": 0.3}},
    ]
    with _Recorder() as rec:
        result = _run(synth, tmp_path / "lr", stages=stages, batch_size=2, accumulate=2, samples_per_epoch=12,
                      optimizer__name="adam")
    per_epoch = 3  # 12 samples / (2 x 2) per optimizer step
    assert result.steps == len(rec.lrs) == 8 * per_epoch
    used = [rec.lrs[e * per_epoch:(e + 1) * per_epoch] for e in range(8)]
    for epoch_lrs, row in zip(used, result.history):
        assert row["lr"] == epoch_lrs[-1]  # the rate of the epoch's last step
    # plateau (mode max, patience 0): the rate of an epoch follows the scores before it
    scores = [row["val_triplet_dice"] for row in result.history[:3]]
    lr, best = 1e-2, -1.0
    for e in range(3):
        assert used[e] == [pytest.approx(lr)] * per_epoch
        if scores[e] > best:
            best = scores[e]
        else:
            lr *= 0.5
    # cosine per epoch, from the stage's own rate (a fresh optimizer and schedule per stage)
    for e, want in enumerate([1e-3, 1e-5 + (1e-3 - 1e-5) * 0.5, 1e-5]):
        assert used[3 + e] == [pytest.approx(want)] * per_epoch
    # one-cycle per optimizer step over the stage's 6 steps (accumulation counted), warm-up first
    cycle = [lr for epoch_lrs in used[6:] for lr in epoch_lrs]
    assert cycle[0] == pytest.approx(4e-3 / 25) and cycle[-1] == pytest.approx(4e-3 / 25 / 1e4)
    assert max(cycle) <= 4e-3 and cycle.index(max(cycle)) == 1


def _script_validation_scores(monkeypatch, scores) -> None:
    """Each epoch's validation reports the next of ``scores`` as its triplet Dice (the final,
    after-training validation keeps its own)."""
    scores = iter(scores)
    validate = engine.Trainer._validate

    def scripted(self, model, final=False):
        m = validate(self, model, final=final)
        if not final:
            m["val_triplet_dice"] = next(scores)
        return m

    monkeypatch.setattr(engine.Trainer, "_validate", scripted)


def test_init_best_starts_from_the_previous_stages_best_epoch_and_top_k_keeps_the_best(synth, tmp_path, monkeypatch):
    _script_validation_scores(monkeypatch, [0.5, 0.9, 0.3, 0.2, 0.8, 0.85, 0.95])
    epoch_fn = engine.Trainer._train_epoch
    starts, ends = [], []

    def recorded(self, *a, **k):
        starts.append({n: v.detach().clone() for n, v in self.model.state_dict().items()})
        row = epoch_fn(self, *a, **k)
        ends.append({n: v.detach().clone() for n, v in self.model.state_dict().items()})
        return row

    monkeypatch.setattr(engine.Trainer, "_train_epoch", recorded)
    stages = [{"name": "a", "epochs": 3}, {"name": "b", "epochs": 3, "init": "best"},
              {"name": "c", "epochs": 1, "init": "best"}]
    result = _run(synth, tmp_path / "best", stages=stages, batch_size=2, checkpoint={"keep_top_k": 2})
    equal = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)
    assert equal(starts[3], ends[1]) and not equal(starts[3], ends[2])  # stage a's best is epoch 2
    # stage b (best 0.85) never beat epoch 2 (0.9): stage c starts from epoch 2, as SIIM 1st's
    # best-checkpoint file, not from stage b's best
    assert equal(starts[6], ends[1]) and not equal(starts[6], ends[5])
    kept = sorted(p.name for p in (tmp_path / "best" / "checkpoints").glob("epoch-*.pt"))
    assert kept == ["epoch-002.pt", "epoch-007.pt"] and result.metrics["best_epoch"] == 7
    assert equal(result.model.state_dict(), ends[6])  # the saved model is the best epoch's


class _Interrupted(BaseException):
    pass


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_weights_with_accumulation_ema_and_schedules(synth, tmp_path, monkeypatch):
    stages = [
        {"name": "a", "epochs": 2, "lr": 3e-3, "scheduler": {"name": "onecycle", "warmup": 0.3}},
        {"name": "b", "epochs": 2, "lr": 1e-3, "init": "best", "scheduler": {"name": "cosine", "t_max": 2}},
    ]
    changes = dict(stages=stages, batch_size=2, accumulate=2, samples_per_epoch=12, ema=0.8, optimizer__name="adamw",
                   model__aux_classifier=True, augment={"enabled": True, "affine_p": 0.5, "rotate": 10.0},
                   checkpoint={"every_steps": 1, "keep_top_k": 2})
    straight = _run(synth, tmp_path / "straight", **changes)
    save = engine.save_checkpoint
    written = [0]

    def save_then_stop(folder, name, payload):
        save(folder, name, payload)
        if name == engine.LAST:
            written[0] += 1
            if written[0] == 5:  # mid-way through the one-cycle stage's second epoch
                raise _Interrupted()

    monkeypatch.setattr(engine, "save_checkpoint", save_then_stop)
    with pytest.raises(_Interrupted):
        _run(synth, tmp_path / "cut", **changes)
    monkeypatch.setattr(engine, "save_checkpoint", save)
    resumed = train(training_config(TINY, synth, **changes), tmp_path / "cut", resume=True, progress=False)
    assert straight.steps == resumed.steps == 12
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    timing = ("seconds", "images_per_s")
    assert [{k: v for k, v in r.items() if k not in timing} for r in straight.history] == \
           [{k: v for k, v in r.items() if k not in timing} for r in resumed.history]


def test_epoch_of_every_positive_once_sizes_each_epoch_from_its_ratio(synth, tmp_path, monkeypatch):
    from pneumoseg.train.distributed import DistributedRatioSampler

    orders: list[list[int]] = []
    deal = DistributedRatioSampler.__iter__

    def recorded(self):
        orders.append(list(deal(self)))
        return iter(orders[-1])

    monkeypatch.setattr(DistributedRatioSampler, "__iter__", recorded)
    cfg = training_config(TINY, synth, epochs=3, batch_size=2, samples_per_epoch=None, positive_ratio=[0.8, 0.4],
                          epoch_size="positives", scheduler={"name": "onecycle", "warmup": 0.2})
    with _Recorder() as rec:
        result = train(cfg, tmp_path / "once", progress=False)
    labels = [int(v) for v in engine.Trainer(cfg, tmp_path / "x", progress=False).data.train_labels]
    n_pos = sum(labels)
    for order, ratio in zip(orders, (0.8, 0.6, 0.4)):
        size = round(n_pos / ratio) // 2 * 2  # every positive once + negatives, in whole steps of 2
        positives = [i for i in order if labels[i]]
        assert len(order) == size and len(positives) == round(size * ratio)
        assert len(set(positives)) == len(positives) >= n_pos - 1  # each positive at most once
    assert result.steps == len(rec.lrs) == sum(len(o) for o in orders) // 2
    assert rec.lrs[-1] == pytest.approx(TINY["optimizer"]["lr"] / 25 / 1e4)  # one-cycle over the stage's steps
    assert [row["positive_ratio"] for row in result.history] == pytest.approx([0.8, 0.6, 0.4])


def test_positives_once_sampler_deals_one_global_order_and_every_negative_before_repeats():
    from pneumoseg.train.distributed import DistributedRatioSampler

    labels = [1] * 10 + [0] * 37
    kw = dict(num_samples=None, epochs=4, seed=1, positives_once=True, step=4)
    one = DistributedRatioSampler(labels, [0.8, 0.4], batch_size=4, **kw)
    parts = [DistributedRatioSampler(labels, [0.8, 0.4], batch_size=2, rank=r, world_size=2, **kw) for r in range(2)]
    negatives = []
    for epoch in range(4):
        for s in (one, *parts):
            s.set_epoch(epoch)
        order, shards = list(one), [list(p) for p in parts]
        ratio = 0.8 - 0.4 * epoch / 3
        assert len(order) == round(10 / ratio) // 4 * 4 == len(one) and len(one) % 4 == 0
        assert sum(labels[i] for i in order) == round(len(order) * ratio)
        for b in range(len(order) // 4):
            assert sorted(order[4 * b:4 * b + 4]) == sorted(shards[0][2 * b:2 * b + 2] + shards[1][2 * b:2 * b + 2])
        negatives += [i for i in order if not labels[i]]
    assert len(negatives) == 27 and len(set(negatives)) == 27  # no negative twice before all were seen
    one.set_epoch(3, start_batch=2)
    assert list(one) == one.global_order()[8:].tolist()
    with pytest.raises(ValueError, match="fewer than one optimizer step"):
        DistributedRatioSampler(labels, 1.0, batch_size=4, num_samples=None, positives_once=True, step=16)


@pytest.mark.parametrize(("every", "epochs_run"), [(1, 3), (2, 4)])
def test_early_stopping_counts_epochs_without_improvement(synth, tmp_path, monkeypatch, every, epochs_run):
    # scores only fall after the first validation: early_stopping 2 stops 2 epochs after the best,
    # at the first validation there or after (validating every 2nd epoch it stopped 4 epochs after)
    _script_validation_scores(monkeypatch, [0.5, 0.4, 0.3, 0.2, 0.1])
    result = _run(synth, tmp_path / "stop", epochs=8, early_stopping=2, batch_size=4, samples_per_epoch=4,
                  validation={"every": every, "min_areas": [0], "min_component_areas": [0]})
    assert len(result.history) == epochs_run
    assert result.metrics["best_epoch"] == every


def test_recipe_losses_reach_the_loss_as_the_winners_wrote_them():
    from pneumoseg.train import load_recipe
    from pneumoseg.train.engine import TaskLoss

    torch.manual_seed(0)
    logits = torch.randn(2, 1, 24, 24, dtype=torch.float64) * 3
    masks = (torch.rand(2, 1, 24, 24) < 0.1).double()
    masks[1] = 0  # an empty image in the batch: batch-wide Dice
    # SIIM 1st's ComboLoss (Losses.py): 3 x BCE + 1 x soft Dice over the batch (eps 1e-6) + 4 x focal (gamma 2)
    p = torch.sigmoid(logits)
    bce = (logits.clamp(min=0) - logits * masks + torch.log1p(torch.exp(-logits.abs()))).mean()
    dice = 1 - (2 * (p * masks).sum() + 1e-6) / (p.sum() + masks.sum() + 1e-6)
    pt = torch.where(masks > 0, p, 1 - p).clamp(1e-8, 1 - 1e-8)
    focal = (-(1 - pt) ** 2 * pt.log()).mean()
    got = TaskLoss(load_recipe("siim-1st"))(logits, masks, torch.tensor([1.0, 0.0]))
    assert got.item() == pytest.approx((3 * bce + dice + 4 * focal).item(), rel=1e-6)
    # the classifier recipe: BCE with positives weighted 2
    scores, labels = torch.randn(6, 1, dtype=torch.float64), torch.tensor([1.0, 0, 0, 1, 0, 0])
    s = torch.sigmoid(scores[:, 0])
    want = -(2 * labels * s.log() + (1 - labels) * (1 - s).log()).mean()
    assert TaskLoss(load_recipe("classifier"))(scores, None, labels).item() == pytest.approx(want.item(), rel=1e-6)
