"""Adversarial review of the training engine and `pneumoseg train` / `pneumoseg demo`: each test
failed before its fix (a crash mid-run, a silent difference from what the docs promise, or an error
naming what the user never wrote)."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("yaml")

from factories import TINY_DETERMINISTIC_TRAINING as TINY, training_config

from pneumoseg.data import make_synthetic_siim
from pneumoseg.train import ConfigError, engine
from pneumoseg.train.engine import train


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("review-synth")
    make_synthetic_siim(root, n_images=20, size=96, positive_fraction=0.4, seed=3)
    return root


@pytest.mark.parametrize("task", ["segmentation", "classification"])
def test_a_batch_of_one_whose_deepest_map_is_one_pixel_is_refused_before_the_folder_is_touched(synth, tmp_path, task):
    # At 32 px every encoder's stride-32 map is 1x1: with one image per batch, BatchNorm in training
    # mode sees one value per channel and torch raised "Expected more than 1 value per channel" in
    # the first step, after config.yaml was written
    changes = dict(task=task, batch_size=1, data__image_size=32, samples_per_epoch=4)
    if task == "classification":
        changes["validation"] = {"monitor": "auc"}
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"batch_size.*1 value per channel.*frozen"):
        train(training_config(TINY, synth, **changes), out, progress=False)
    assert not out.exists()
    # what the message offers works: frozen BatchNorm (eval-mode statistics), or two images a batch
    for fix in (dict(model__batchnorm="frozen"), dict(batch_size=2)):
        result = train(training_config(TINY, synth, **{**changes, **fix}), tmp_path / str(len(fix) + len(str(fix))),
                       progress=False)
        assert result.steps >= 2


def test_the_batch_of_one_check_costs_nothing_where_it_cannot_fail(monkeypatch):
    # batches of two or more, frozen BatchNorm and larger images never build the meta network for it
    from pneumoseg.train import config_from_dict

    calls = []
    monkeypatch.setattr(engine, "_single_value_batchnorm", lambda *a: calls.append(a))
    for changes in ({"batch_size": 2, "data": {"image_size": 32}},
                    {"batch_size": 1, "data": {"image_size": 32}, "model": {"encoder": "resnet_tiny", "batchnorm": "frozen"}},
                    {"batch_size": 1, "data": {"image_size": 128}}):
        raw = {"model": {"encoder": "resnet_tiny"}, **changes}
        engine.check_model_config(config_from_dict(raw))
    assert calls == []


def _scaler_step(inf: bool, ema_decay: float = 0.5):
    """One optimizer step through the engine's step with a CPU GradScaler; ``inf`` makes a gradient
    infinite so the scaler skips the step."""
    from torch import nn

    from pneumoseg.train.config import SchedulerConfig
    from pneumoseg.train.ema import ModelEMA
    from pneumoseg.train.schedules import StageSchedule

    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    ema = ModelEMA(model, ema_decay)
    with torch.no_grad():
        model.weight.add_(1.0)  # the EMA and the weights differ, so an EMA update would show
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = StageSchedule(optimizer, SchedulerConfig(name="onecycle", warmup=0.3), lr=0.1, epochs=1, steps_per_epoch=10,
                             maximize=True)
    scaler = torch.amp.GradScaler("cpu")
    loss = model(torch.ones(2, 3)).sum()
    scaler.scale(loss).backward()
    if inf:
        model.weight.grad[0, 0] = float("inf")
    weights = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    averaged = ema.module.weight.detach().clone()
    lr = optimizer.param_groups[0]["lr"]
    stepped = engine.optimizer_step(optimizer, model, scaler=scaler, clip_grad_norm=0.1, schedule=schedule, ema=ema)
    return stepped, weights, averaged, lr, model, ema, optimizer, schedule


def test_a_step_the_gradient_scaler_skips_leaves_the_ema_and_the_schedule_alone():
    # fp16 AMP skips a step whose gradients overflowed (often in the first steps, while the scale
    # settles): the weights stay, and so must the schedule and the EMA, which counted the skipped
    # step as an update (pulling the average towards unchanged weights and advancing its warm-up)
    stepped, weights, averaged, lr, model, ema, optimizer, schedule = _scaler_step(inf=True)
    assert stepped is False
    assert torch.equal(torch.nn.utils.parameters_to_vector(model.parameters()), weights)
    assert torch.equal(ema.module.weight, averaged) and ema.updates == 0
    assert optimizer.param_groups[0]["lr"] == lr and schedule.state_dict()["steps"] == 0
    # a finite step: unscaled before the clip (a clip of the scaled gradient would clip nothing away)
    stepped, weights, averaged, lr, model, ema, optimizer, schedule = _scaler_step(inf=False)
    assert stepped is True and ema.updates == 1 and schedule.state_dict()["steps"] == 1
    moved = (weights - torch.nn.utils.parameters_to_vector(model.parameters())).norm().item()
    assert moved == pytest.approx(lr * 0.1, rel=1e-4)  # SGD step of the gradient clipped to norm 0.1
    assert not torch.equal(ema.module.weight, averaged)


def test_demo_with_too_few_studies_for_the_folds_says_so_before_writing(tmp_path, capsys):
    # --n 8 makes 2 studies with pneumothorax; the demo recipe's 4 folds need one in each. It wrote
    # the study sets, then stopped with "config field data.folds: the CSV has 2 positive images"
    # (a CSV and a field the user never wrote)
    from pneumoseg.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--n", "8", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pneumoseg: error: --n 8") and "--n 12" in err and "\n" not in err
    assert not out.exists()
    assert main(["demo", "--n", "12", "--set", "data.folds=5", "--out", str(out), "--no-progress"]) == 2
    assert "--n 16" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize(("steps", "warmup"), [(2, 0.5), (5, 0.2), (10, 0.1), (20, 0.05)])
def test_a_one_cycle_warm_up_of_exactly_one_step(steps, warmup):
    # warmup x steps == 1 made OneCycleLR's warm-up phase zero steps long: ZeroDivisionError when the
    # stage's schedule was built (after the run folder was written)
    from pneumoseg.train.config import SchedulerConfig
    from pneumoseg.train.schedules import StageSchedule

    p = torch.nn.Parameter(torch.ones(1))
    optimizer = torch.optim.SGD([p], lr=0.1)
    schedule = StageSchedule(optimizer, SchedulerConfig(name="onecycle", warmup=warmup), lr=0.1, epochs=1,
                             steps_per_epoch=steps, maximize=True)
    used = []
    for _ in range(steps):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.after_step()
    assert used[0] == pytest.approx(0.1 / 25)  # one warm-up step at the initial rate
    if steps > 2:
        # then the cosine from the peak (at the warm-up's end, step 0) down to the final rate at the last step
        low = 0.1 / 25 / 1e4
        assert used[1] == pytest.approx(low + (0.1 - low) * (1 + math.cos(math.pi / (steps - 1))) / 2, rel=1e-6)
        assert all(a >= b for a, b in zip(used[1:], used[2:]))  # then annealed down
    assert used[-1] == pytest.approx(0.1 / 25 / 1e4) or steps == 2


def test_resume_on_data_whose_split_differs_is_refused(synth, tmp_path):
    # data.root / data.csv may change on --resume (the data moved, or a cache of it is used), but a
    # CSV with other labels or other images gave another fold split: images the run had validated on
    # were trained on from then on, and its thresholds were searched on a mix, without a word
    import shutil

    from pneumoseg.data import read_rle_csv

    changes = dict(epochs=2)
    run = tmp_path / "run"
    train(training_config(TINY, synth, **changes), run, progress=False)
    last = run / "checkpoints" / "last.pt"
    before = last.read_bytes()
    moved = tmp_path / "moved"
    shutil.copytree(synth, moved)
    # the same data elsewhere resumes (the finished run writes its model directory again)
    train(training_config(TINY, moved, **changes), run, resume=True, progress=False)
    # one negative relabelled positive (its mask painted): another split
    rles = read_rle_csv(moved / "train-rle.csv")
    negative = next(i for i, r in rles.items() if r == ["-1"])
    lines = (moved / "train-rle.csv").read_text().splitlines()
    lines = [f"{negative}, 1 10" if line.startswith(negative) else line for line in lines]
    (moved / "train-rle.csv").write_text("\n".join(lines) + "\n")
    assert read_rle_csv(moved / "train-rle.csv")[negative] == ["1 10"]
    before = last.read_bytes()
    with pytest.raises(ConfigError, match=r"data.*other images or labels.*new run folder"):
        train(training_config(TINY, moved, **changes), run, resume=True, progress=False)
    assert last.read_bytes() == before


def test_average_checkpoints_refuses_weights_of_another_shape(synth, tmp_path):
    # Only the model config and key names were compared: a later checkpoint holding a (1,) tensor
    # under a key of shape (C,) was broadcast into the running sum, a silently wrong average
    from pneumoseg.errors import DataFormatError
    from pneumoseg.train import average_checkpoints

    run = tmp_path / "run"
    train(training_config(TINY, synth), run, progress=False)
    good = run / "checkpoints" / "last.pt"
    data = torch.load(good, weights_only=True)
    key = "encoder.bn1.weight"
    assert data["model"][key].numel() > 1
    data["model"][key] = data["model"][key][:1].clone()
    bad = tmp_path / "bad.pt"
    torch.save(data, bad)
    for order in ([good, bad], [bad, good]):
        with pytest.raises(DataFormatError, match=r"bad\.pt.*encoder\.bn1\.weight"):
            average_checkpoints(order)
