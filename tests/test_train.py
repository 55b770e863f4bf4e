"""The training engine on a tiny synthetic study set: the run folder is a valid model directory,
checkpoints load with weights_only=True, bad input fails before any step, the sampler, EMA,
schedules and ensembling, and (slow) the demo recipe learns."""

from __future__ import annotations

import csv
import io
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("yaml")

import pneumoseg  # noqa: E402
from pneumoseg.data import make_synthetic_siim  # noqa: E402
from pneumoseg.models.model_dir import load_model_dir  # noqa: E402
from pneumoseg.train import load_recipe  # noqa: E402
from pneumoseg.train.checkpoint import load_checkpoint  # noqa: E402
from pneumoseg.train.distributed import DistributedRatioSampler  # noqa: E402
from pneumoseg.train.engine import train  # noqa: E402

from factories import training_config  # noqa: E402

TINY = {
    "task": "segmentation",
    "data": {"image_size": 64, "folds": 4, "preload": True},
    "model": {"encoder": "resnet_tiny", "decoder_channels": [16, 16, 8, 8, 8]},
    "loss": {"bce": 1.0, "dice": 1.0, "focal": 1.0, "dice_smooth": 1.0},
    "optimizer": {"name": "adam", "lr": 2e-3},
    "epochs": 2, "batch_size": 4, "samples_per_epoch": 8, "positive_ratio": 0.5,
    "augment": {"affine_p": 0.5, "rotate": 10.0},
    "validation": {"min_areas": [0, 10, 40], "min_component_areas": [0, 8]},
    "checkpoint": {"keep_top_k": 1},
    "log": {"progress": False, "tensorboard": False},
    "threads": 1,  # tiny tensors: one thread is as fast, and immune to a busy machine's oversubscription
}


def tiny(root, **changes) -> "pneumoseg.train.TrainConfig":
    return training_config(TINY, root, **changes)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-synth")
    make_synthetic_siim(root, n_images=20, size=96, positive_fraction=0.4, seed=3)
    return root


def test_run_folder_is_a_model_directory(synth, tmp_path):
    out = tmp_path / "run"
    result = train(tiny(synth, ema=0.9), out, progress=False)
    assert result.steps == 4 and result.metrics["epochs"] == 2
    md = load_model_dir(out)
    assert set(md.networks) == {"segmenter"} and md.networks["segmenter"].input_size == (64, 64)
    seg = md.build("segmenter")
    with torch.no_grad():
        assert seg(torch.zeros(1, 1, 64, 64)).shape == (1, 1, 64, 64)
    # the saved weights are the ones the run returns (EMA weights: ema was on)
    for k, v in result.model.state_dict().items():
        assert torch.equal(v, seg.state_dict()[k]), k
    t = md.thresholds
    assert t.top in (0.5, 0.6, 0.7, 0.75, 0.8, 0.9) and t.bottom in (0.2, 0.3, 0.4, 0.5)
    assert t.min_area in (0, 10, 40) and t.min_component_area in (0, 8)
    m = md.metrics
    assert {"kaggle_dice", "triplet_dice", "empty_baseline", "steps", "best_epoch"} <= set(m)
    assert m["kaggle_dice"] == pytest.approx(m["kaggle_dice_by_min_component_area"][str(t.min_component_area)])
    # without a component filter, the native post-processing reproduces the triplet search's score
    assert m["kaggle_dice_by_min_component_area"]["0"] == pytest.approx(m["triplet_dice"], abs=1e-12)
    assert m["kaggle_dice"] >= m["triplet_dice"]
    assert md.training["config"]["model"]["encoder"] == "resnet_tiny"
    rows = list(csv.DictReader(io.StringIO((out / "metrics.csv").read_text())))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and all(r["val_triplet_dice"] for r in rows)
    for name in ("loss.png", "dice.png", "roc.png", "pr.png", "confusion.png"):
        assert (out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "config.yaml").is_file()
    ckpts = sorted((out / "checkpoints").glob("*.pt"))
    assert {p.name for p in ckpts} >= {"last.pt", "stage-best.pt"} and len(ckpts) == 3  # last, stage-best, top-1
    for p in ckpts:
        data = torch.load(p, weights_only=True)  # nothing but tensors and plain containers
        assert data["format"] == "pneumoseg-checkpoint" and data["model_config"] == md.networks["segmenter"].config
        assert data["pneumoseg_version"] == pneumoseg.__version__ and data["config"]["epochs"] == 2
    last = load_checkpoint(out / "checkpoints" / "last.pt")
    assert last["progress"]["finished"] and last["progress"]["global_step"] == 4
    assert {"optimizer", "schedule", "rng", "ema", "history", "thresholds"} <= set(last)
    # running again into the same folder replaces the run (pneumoseg's own output)
    train(tiny(synth, epochs=1), out, progress=False)
    assert len(list(csv.DictReader(io.StringIO((out / "metrics.csv").read_text())))) == 1


def test_classification_run_and_safetensors_export(synth, tmp_path):
    from pneumoseg.train import checkpoint_to_safetensors

    cfg = tiny(synth, task="classification", data__image_size=48, loss__pos_weight=2.0, data__chest_crop=True)
    result = train(cfg, tmp_path / "cls", progress=False)
    md = load_model_dir(tmp_path / "cls")
    assert set(md.networks) == {"classifier"} and md.gate_source == "classifier"
    assert 0.0 <= md.thresholds.gate <= 1.0 and "auc" in result.metrics and md.training["chest_crop"] is True
    assert md.networks["classifier"].crop == "chest"  # what the Predictor applies
    st = checkpoint_to_safetensors(tmp_path / "cls" / "checkpoints" / "last.pt", tmp_path / "w.safetensors")
    from safetensors.torch import load_file

    weights = load_file(st)
    assert set(weights) == set(md.build("classifier").state_dict())


def test_two_stage_run_gates_with_the_classifier(synth, tmp_path):
    cfg = tiny(synth, epochs=1, classifier={"data": {"image_size": 32}, "model": {"encoder": "resnet_tiny"},
                                             "epochs": 1, "batch_size": 4, "samples_per_epoch": 8,
                                             "log": {"progress": False, "tensorboard": False, "plots": False}})
    result = train(cfg, tmp_path / "two", progress=False)
    md = load_model_dir(tmp_path / "two")
    assert set(md.networks) == {"segmenter", "classifier"} and md.gate_source == "classifier"
    assert md.networks["classifier"].input_size == (32, 32) and result.metrics["gate"] == "classifier"
    assert load_model_dir(tmp_path / "two" / "classifier").networks.keys() == {"classifier"}
    assert result.classifier is not None and result.classifier.steps == 2
    # the segmenter with a classification head gates itself
    head = train(tiny(synth, epochs=1, model__aux_classifier=True), tmp_path / "head", progress=False)
    assert load_model_dir(tmp_path / "head").gate_source == "segmenter" and "auc" in head.metrics


def test_bad_input_fails_before_any_step(synth, tmp_path):
    from pneumoseg.train import ConfigError

    out = tmp_path / "never"
    with pytest.raises(ConfigError, match="model.encoder: unknown encoder 'resnet35'"):
        train(tiny(synth, model__encoder="resnet35"), out, progress=False)
    with pytest.raises(ConfigError, match="data.root: .*no such data folder"):
        train(tiny(tmp_path / "missing"), out, progress=False)
    # a CSV without a positive image in a fold
    flat = tmp_path / "negatives"
    make_synthetic_siim(flat, n_images=8, size=64, positive_fraction=0.0, seed=1)
    with pytest.raises(ValueError, match="positive images, fewer than the 4 folds"):
        train(tiny(flat), out, progress=False)
    every = tmp_path / "positives"
    make_synthetic_siim(every, n_images=8, size=64, positive_fraction=1.0, seed=2)
    with pytest.raises(pneumoseg.DataFormatError, match="fold 0 of 4 has no negative image in its training part"):
        train(tiny(every), out, progress=False)
    assert not out.exists()  # nothing was written
    # a checkpoint of another architecture
    run = tmp_path / "run"
    train(tiny(synth, epochs=1), run, progress=False)
    with pytest.raises(ValueError, match="checkpoint holds a unet segmenter on resnet_tiny, but the config builds a unet segmenter on resnet34"):
        train(tiny(synth, model__encoder="resnet34", model__decoder_channels=[16, 16, 8, 8, 8]), run, resume=True,
              progress=False)
    with pytest.raises(pneumoseg.OutputError, match="nothing to resume"):
        train(tiny(synth), tmp_path / "fresh", resume=True, progress=False)


def test_a_diverging_run_stops_with_a_training_error(synth, tmp_path, monkeypatch):
    # From the second batch on the loss is NaN (as a run whose weights blew up): training stops at the
    # next loss read with a TrainingError saying where, instead of spreading NaN through the weights
    # and writing a model directory of them.
    from pneumoseg.train import ConfigError
    from pneumoseg.train.engine import TaskLoss

    forward, calls = TaskLoss.__call__, []

    def nan_after_one(self, *args, **kwargs):
        calls.append(1)
        loss = forward(self, *args, **kwargs)
        return loss if len(calls) == 1 else loss * float("nan")

    monkeypatch.setattr(TaskLoss, "__call__", nan_after_one)
    with pytest.raises(pneumoseg.TrainingError, match=r"loss became nan in epoch 1, batches 1-2 .*learning rate"):
        train(tiny(synth, epochs=1), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "pneumoseg.json").exists()
    with pytest.raises(ConfigError, match=r"optimizer.lr: must be at most 1000, got 1e\+20"):
        tiny(synth, optimizer__lr=1e20)


def test_cli_train_and_one_line_errors(synth, tmp_path):
    exe = [sys.executable, "-m", "pneumoseg"]
    out = tmp_path / "cli-run"
    sets = ["--set", "model.decoder_channels=[16,16,8,8,8]", "--set", "epochs=1", "--set", "samples_per_epoch=8",
            "--set", "batch_size=4", "--set", "data.image_size=64", "--set", "classifier.epochs=1",
            "--set", "classifier.samples_per_epoch=8", "--set", "classifier.data.image_size=32",
            "--set", "classifier.batch_size=4", "--set", "log.plots=false", "--set", "classifier.log.plots=false",
            "--set", "threads=1"]
    done = subprocess.run([*exe, "train", "--recipe", "demo", "--data", str(synth), "--out", str(out), "--no-progress",
                           *sets], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "validation Kaggle Dice" in done.stdout and "model directory" in done.stdout
    assert set(load_model_dir(out).networks) == {"segmenter", "classifier"}
    bad = subprocess.run([*exe, "train", "--recipe", "demo", "--data", str(synth), "--out", str(tmp_path / "x"),
                          "--set", "model.encoder=resnet35"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert bad.stderr.startswith("pneumoseg: error: config field model.encoder: unknown encoder 'resnet35'")
    listed = subprocess.run([*exe, "train", "--list-recipes"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and listed.stdout.splitlines()[0].startswith("classifier")


def test_distributed_sampler_deals_one_global_order():
    labels = [1] * 10 + [0] * 30
    one = DistributedRatioSampler(labels, [0.8, 0.4], num_samples=24, batch_size=4, epochs=3, seed=5)
    parts = [DistributedRatioSampler(labels, [0.8, 0.4], num_samples=24, batch_size=2, epochs=3, seed=5, rank=r,
                                     world_size=2) for r in range(2)]
    for epoch in range(3):
        for s in (one, *parts):
            s.set_epoch(epoch)
        order = list(one)
        shards = [list(p) for p in parts]
        for b in range(6):  # global batch b = rank 0's and rank 1's batch b together
            assert sorted(order[4 * b:4 * b + 4]) == sorted(shards[0][2 * b:2 * b + 2] + shards[1][2 * b:2 * b + 2])
        positives = sum(labels[i] for i in order)
        assert positives == round(24 * (0.8 - 0.2 * epoch))
    one.set_epoch(1, start_batch=2)  # resuming inside an epoch skips its first batches
    assert list(one) == one.global_order()[8:].tolist() and len(one) == 16
    plain = DistributedRatioSampler(labels, None, num_samples=40, batch_size=8, seed=0)
    assert sorted(plain) == list(range(40))  # without a ratio: a shuffle of every image
    with pytest.raises(ValueError, match="no global batch"):
        DistributedRatioSampler(labels, None, num_samples=3, batch_size=2, world_size=2)


def test_ema_schedules():
    from pneumoseg.train.config import SchedulerConfig
    from pneumoseg.train.ema import ModelEMA
    from pneumoseg.train.schedules import StageSchedule, build_optimizer
    from pneumoseg.train.config import OptimizerConfig

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    ema = ModelEMA(net, 0.9)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    d = min(0.9, 2 / 11)
    assert torch.allclose(ema.module.weight, d * start["weight"] + (1 - d) * net.weight)
    opt = build_optimizer(net.parameters(), OptimizerConfig(name="sgd"), 0.1)
    sched = StageSchedule(opt, SchedulerConfig(name="onecycle", warmup=0.5), lr=0.1, epochs=2, steps_per_epoch=5,
                          maximize=True)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.after_step()
    assert lrs[0] == pytest.approx(0.1 / 25) and max(lrs) == pytest.approx(0.1) and lrs[-1] < lrs[5]
    opt = build_optimizer(net.parameters(), OptimizerConfig(), 1.0)
    plateau = StageSchedule(opt, SchedulerConfig(name="plateau", patience=0), lr=1.0, epochs=5, steps_per_epoch=1,
                            maximize=True)
    opt.step()
    plateau.after_epoch(0.5)
    plateau.after_epoch(0.4)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    opt = build_optimizer(net.parameters(), OptimizerConfig(name="adamw"), 1.0)
    cosine = StageSchedule(opt, SchedulerConfig(name="cosine", t_max=2, eta_min=0.0), lr=1.0, epochs=4,
                           steps_per_epoch=1, maximize=True)
    opt.step()
    cosine.after_epoch(None)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)


def test_average_checkpoints_and_batchnorm_recompute(synth, tmp_path):
    from pneumoseg.train import average_checkpoints
    from pneumoseg.train.checkpoint import checkpoint_state_dict

    run = tmp_path / "avg"
    train(tiny(synth, epochs=2, checkpoint__keep_top_k=2, validation__monitor="loss"), run, progress=False)
    files = sorted((run / "checkpoints").glob("epoch-*.pt"))
    assert len(files) == 2
    states = [checkpoint_state_dict(f) for f in files]
    torch.manual_seed(0)
    images = torch.randn(6, 1, 64, 64)
    avg = average_checkpoints(files, batches=[{"image": images[:3]}, {"image": images[3:]}])
    sd = avg.state_dict()
    key = "encoder.conv1.weight"
    assert torch.allclose(sd[key], (states[0][key] + states[1][key]) / 2)
    # the first BatchNorm's statistics are now exactly those of its input over the 6 images
    with torch.no_grad():
        first = avg.encoder.conv1(images)
    assert torch.allclose(avg.encoder.bn1.running_mean, first.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(avg.encoder.bn1.running_var, first.var((0, 2, 3), unbiased=True), rtol=1e-3, atol=1e-5)
    with pytest.warns(UserWarning, match="recompute"):
        average_checkpoints(files)
    other = tmp_path / "other"
    train(tiny(synth, epochs=1, model__aux_classifier=True), other, progress=False)
    with pytest.raises(ValueError, match="classification head"):
        average_checkpoints([files[0], other / "checkpoints" / "last.pt"])


def test_stacked_classifier():
    from pneumoseg.models import create_classifier
    from pneumoseg.train import StackedClassifier, fit_stacked_classifier

    torch.manual_seed(0)
    members = [create_classifier("resnet_tiny", in_channels=1), create_classifier("resnet_tiny", in_channels=1)]
    frozen = [{k: v.clone() for k, v in m.state_dict().items()} for m in members]
    stack = StackedClassifier(members, hidden=16, input_sizes=[64, None])
    x = torch.randn(8, 1, 32, 32)
    assert stack.features(x).shape == (8, 2 * members[0].num_features) and stack(x).shape == (8, 1)
    labels = (x.mean((1, 2, 3)) > 0).float()
    loader = [{"image": x, "label": labels}]
    losses = fit_stacked_classifier(stack, loader, epochs=10, lr=1e-2)
    assert losses[-1] < losses[0]
    for m, before in zip(members, frozen):  # members untouched, BatchNorm statistics included
        assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    with pytest.raises(ValueError, match="at least one"):
        StackedClassifier([])


@pytest.mark.slow
def test_demo_recipe_learns(tmp_path):
    """The demo recipe (as `pneumoseg demo` runs it) on the synthetic study set: the segmenter beats
    the all-empty submission clearly and the classifier separates the classes."""
    root = tmp_path / "synth"
    make_synthetic_siim(root, n_images=96, size=256, positive_fraction=0.3, seed=0)
    result = train(load_recipe("demo", data={"root": str(root)}, overrides=["log.progress=false"]),
                   tmp_path / "run", progress=False)
    m = result.metrics
    assert m["kaggle_dice"] >= m["empty_baseline"] + 0.15, m
    assert result.classifier.metrics["auc"] >= 0.9, result.classifier.metrics
    print(f"demo: Kaggle Dice {m['kaggle_dice']:.4f} vs all-empty {m['empty_baseline']:.4f}; "
          f"classifier AUC {result.classifier.metrics['auc']:.4f}")


def test_loader_workers_are_capped_at_the_usable_cpus(synth, tmp_path, monkeypatch):
    """The classifier and siim-1st recipes ask for 4 DataLoader workers (a GPU server's need); on a
    2-CPU machine torch warned mid-run that this may freeze it. They are capped, with a note, and the
    run is the one an uncapped loader gives (workers only load)."""
    from pneumoseg.train import engine

    monkeypatch.setattr(engine, "_usable_cpus", lambda: 1)
    assert engine.loader_workers(1) == (1, None)
    capped, note = engine.loader_workers(64)
    assert capped == 1 and "data.workers 64" in note and "1 CPUs" in note
    result = train(tiny(synth, epochs=1, data__workers=64), tmp_path / "run", progress=False)  # warnings are errors
    assert any("data.workers 64 capped" in n for n in result.notes)
    reference = train(tiny(synth, epochs=1, data__workers=0), tmp_path / "ref", progress=False)
    for key in ("val_loss", "kaggle_dice_at_threshold"):
        assert result.metrics[key] == reference.metrics[key]


def test_a_fold_smaller_than_one_batch_names_batch_size(synth, tmp_path):
    """With no samples_per_epoch set, a training fold smaller than one optimizer step was reported as
    'config field samples_per_epoch: ...', a field the user never set; the way out is batch_size."""
    from pneumoseg.train.config import ConfigError

    with pytest.raises(ConfigError, match=r"config field batch_size: the training fold holds 15 images.*lower batch_size"):
        train(tiny(synth, samples_per_epoch=None, batch_size=16), tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match="config field samples_per_epoch: 8 samples per epoch"):
        train(tiny(synth, batch_size=16), tmp_path / "run2", progress=False)
