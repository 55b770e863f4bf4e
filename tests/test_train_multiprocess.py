"""Training across processes: SIGKILL then --resume finishes the same run (bit for bit), and two gloo
processes under torchrun hold identical weights equal to one process on the same global batch."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
yaml = pytest.importorskip("yaml")

from pneumoseg.data import make_synthetic_siim  # noqa: E402
from pneumoseg.models.model_dir import load_model_dir  # noqa: E402
from pneumoseg.train.checkpoint import load_checkpoint  # noqa: E402

WORKER = Path(__file__).with_name("train_worker.py")
BASE = {
    "task": "segmentation",
    "data": {"image_size": 64, "folds": 4, "preload": True},
    "model": {"encoder": "resnet_tiny", "decoder_channels": [16, 16, 8, 8, 8]},
    "loss": {"bce": 1.0, "dice": 1.0, "focal": 1.0, "dice_smooth": 1.0},
    "optimizer": {"name": "adam", "lr": 2e-3},
    "batch_size": 4, "positive_ratio": [0.6, 0.4],
    "validation": {"min_areas": [0, 10, 40], "min_component_areas": [0, 8]},
    "checkpoint": {"keep_top_k": 2},
    "log": {"progress": False, "tensorboard": False, "plots": False},
    "threads": 1,
}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp-synth")
    make_synthetic_siim(root, n_images=20, size=96, positive_fraction=0.4, seed=3)
    return root


def _config(tmp_path: Path, root: Path, name: str, **top) -> Path:
    raw = copy.deepcopy(BASE)
    raw["data"]["root"] = str(root)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key].update(value)
        else:
            raw[key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _env() -> dict:
    env = dict(os.environ)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def _weights(run: Path) -> dict:
    return load_model_dir(run).state_dict("segmenter")


@pytest.mark.slow
def test_sigkill_then_resume_finishes_the_same_run(synth, tmp_path):
    # 3 epochs x 4 steps, a checkpoint after every step; a classification head (dropout) and EMA
    # make the RNG and averaging state part of what must be restored
    cfg = _config(tmp_path, synth, "resume", epochs=3, samples_per_epoch=16, ema=0.9,
                  model={"aux_classifier": True}, checkpoint={"every_steps": 1, "keep_top_k": 2})
    cmd = [sys.executable, "-m", "pneumoseg", "train", str(cfg), "--no-progress", "--out"]
    # the uninterrupted run shares nothing with the killed one but the config (one torch thread
    # each): it runs beside the kill and the resume, on the core the test would otherwise leave idle
    straight = tmp_path / "straight"
    straight_proc = subprocess.Popen([*cmd, str(straight)], env=_env(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
    try:
        killed = tmp_path / "killed"
        proc = subprocess.Popen([*cmd, str(killed)], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        last = killed / "checkpoints" / "last.pt"
        deadline = time.monotonic() + 240
        step = 0
        while time.monotonic() < deadline and proc.poll() is None:
            if last.is_file():
                step = load_checkpoint(last)["progress"]["global_step"]
                if step >= 2:
                    break
            time.sleep(0.02)
        proc.kill()
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == -9, f"the run ended by itself before it could be killed: {err.decode()[-2000:]}"
        state = load_checkpoint(last)  # the file written last before the kill is whole
        assert not state["progress"]["finished"] and 2 <= state["progress"]["global_step"] < 12
        assert not (killed / "pneumoseg.json").exists()

        resumed = subprocess.run([*cmd, str(killed), "--resume"], env=_env(), capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        _, straight_err = straight_proc.communicate(timeout=300)
        assert straight_proc.returncode == 0, straight_err[-3000:]
    finally:
        if straight_proc.poll() is None:  # a check above failed: nothing is left running
            straight_proc.kill()
            straight_proc.communicate()

    a, b = load_model_dir(killed), load_model_dir(straight)
    assert a.metrics["steps"] == b.metrics["steps"] == 12 and a.metrics["epochs"] == 3
    wa, wb = _weights(killed), _weights(straight)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), [k for k in wa if not torch.equal(wa[k], wb[k])][:5]
    assert a.thresholds == b.thresholds and a.metrics["kaggle_dice"] == b.metrics["kaggle_dice"]
    timing = ("seconds", "images_per_s")
    rows = [[{k: v for k, v in r.items() if k not in timing} for r in md.training["history"]] for md in (a, b)]
    assert rows[0] == rows[1]
    # --resume on a finished run writes its model directory again and changes nothing else
    again = subprocess.run([*cmd, str(killed), "--resume"], env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(torch.equal(_weights(killed)[k], wb[k]) for k in wb)


def _initial(key: str):
    from pneumoseg.train import config_from_dict
    from pneumoseg.train.engine import build_network

    torch.manual_seed(0)  # the engine seeds the network with config.seed (0) before building it
    return build_network(config_from_dict({"model": BASE["model"]})).state_dict()[key].double()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_on_the_global_batch(synth, tmp_path):
    from safetensors.torch import load_file, safe_open

    # Frozen BatchNorm and per-image Dice make every term a mean over images, so averaging two
    # processes' gradients is the gradient of the global batch (see pneumoseg.train.distributed).
    common = dict(epochs=1, samples_per_epoch=16, optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9},
                  model={"batchnorm": "frozen"}, loss={"per_image_dice": True}, augment={"enabled": False})
    two = _config(tmp_path, synth, "two", batch_size=2, **common)
    one = _config(tmp_path, synth, "one", batch_size=4, **common)
    dump = tmp_path / "weights"
    dump.mkdir()
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
              f"--master_port={_free_port()}", "--master_addr=127.0.0.1", str(WORKER)]
    ddp = subprocess.run([*launch, str(two), str(tmp_path / "ddp-run"), str(dump)], env=_env(), capture_output=True,
                         text=True, timeout=400)
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    single = subprocess.run([sys.executable, str(WORKER), str(one), str(tmp_path / "one-run"), str(dump)], env=_env(),
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-4000:]
    r0, r1, s = (load_file(dump / f"rank{n}.safetensors") for n in ("0", "1", "single"))
    assert r0.keys() == r1.keys() == s.keys()
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # both ranks hold the same weights
    worst = max(float((r0[k].double() - s[k].double()).abs().max()) for k in s if s[k].is_floating_point())
    changed = max(float((r0[k].double() - _initial(k)).abs().max()) for k in r0 if k.endswith("conv1.weight"))
    assert changed > 1e-3  # training moved the weights: the equality above is not the initial weights
    assert worst < 5e-5, worst  # float32 gradient all-reduce vs one sum: 4e-6 measured
    print(f"2 gloo processes vs 1 process: largest weight difference {worst:.2e}")
    with safe_open(dump / "rank0.safetensors", "pt") as f0, safe_open(dump / "ranksingle.safetensors", "pt") as f1:
        m0, m1 = f0.metadata(), f1.metadata()
    assert m0["steps"] == m1["steps"] == "4" and m0["validation_images"] == m1["validation_images"] == "5"
    assert float(m0["val_loss"]) == pytest.approx(float(m1["val_loss"]), rel=1e-4)
    # rank 0 wrote the run folder: a model directory; the metrics cover the whole validation fold
    md = load_model_dir(tmp_path / "ddp-run")
    assert md.metrics["validation_images"] == 5 and json.dumps(md.metrics)
