"""Cases of training's EMA, schedules, checkpoints and top-k worked out by hand from their documented
rules, each added by the mutation audit (round 2) where a planted bug passed the other training tests."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from pneumoseg.train.ema import ModelEMA  # noqa: E402


def test_a_reloaded_ema_continues_its_warm_up_where_it_stopped():
    # decay warms up as min(decay, (1 + n) / (10 + n)) over the n-th update: an EMA saved after 5
    # updates and loaded into a fresh one takes its 6th update with d = 7 / 16, not its 1st (2 / 11).
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = ModelEMA(model, 0.999)
    for _ in range(5):
        ema.update(model)
    resumed = ModelEMA(nn.Linear(3, 2), 0.5)
    resumed.load_state_dict(ema.state_dict())
    assert (resumed.decay, resumed.updates) == (0.999, 5)
    before = resumed.module.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    resumed.update(model)
    d = 7 / 16
    torch.testing.assert_close(resumed.module.weight, d * before + (1 - d) * model.weight.detach())


def test_the_ema_copy_is_changed_only_by_update():
    # The EMA holds an average of trained weights: running it forward (validation does) must not
    # move its BatchNorm statistics, whatever mode the trained model was in when it was copied.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).train()
    ema = ModelEMA(model, 0.9)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        ema.module(torch.randn(4, 1, 8, 8) * 5 + 3)
    for k, v in ema.module.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)
    assert not any(p.requires_grad for p in ema.module.parameters())


def _one_cycle(total: int = 10):
    from pneumoseg.train.config import SchedulerConfig
    from pneumoseg.train.schedules import StageSchedule

    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    schedule = StageSchedule(optimizer, SchedulerConfig(name="onecycle", warmup=0.3), lr=0.1, epochs=1,
                             steps_per_epoch=total, maximize=True)
    return optimizer, schedule


def test_a_resumed_one_cycle_schedule_continues_its_step_count():
    # A one-cycle stage of 10 optimizer steps, interrupted after 6: the resumed schedule must take
    # steps 7 to 10 at the rates of an uninterrupted one, and stop stepping at the stage's end
    # (OneCycleLR refuses a step past its total) however many steps are called.
    opt_a, whole = _one_cycle()
    rates = []
    for _ in range(12):
        opt_a.step()  # as optimizer_step does: the optimizer, then the schedule
        whole.after_step()
        rates.append(opt_a.param_groups[0]["lr"])
    opt_b, first = _one_cycle()
    for _ in range(6):
        opt_b.step()
        first.after_step()
    opt_c, resumed = _one_cycle()
    opt_c.load_state_dict(opt_b.state_dict())
    resumed.load_state_dict(first.state_dict())
    later = []
    for _ in range(6):
        opt_c.step()
        resumed.after_step()
        later.append(opt_c.param_groups[0]["lr"])
    assert later == rates[6:]
    assert resumed.state_dict()["steps"] == 12


def _rank_key(monitor: str, **metrics):
    """Trainer._rank_key for a run monitoring ``monitor`` (only the config field it reads)."""
    from types import SimpleNamespace

    from pneumoseg.train.engine import Trainer

    trainer = SimpleNamespace(cfg=SimpleNamespace(monitor=monitor), maximize=monitor != "loss")
    trainer._monitor_value = lambda m: Trainer._monitor_value(trainer, m)
    return Trainer._rank_key(trainer, metrics)


def test_epochs_rank_by_the_monitored_score_then_the_lower_loss_and_a_tie_is_no_improvement():
    from pneumoseg.train.engine import _better

    # monitoring the loss: the lower loss is the better epoch
    assert _better(_rank_key("loss", val_loss=0.2), _rank_key("loss", val_loss=0.3))
    assert not _better(_rank_key("loss", val_loss=0.3), _rank_key("loss", val_loss=0.2))
    # monitoring a score: the higher score, and at equal scores the lower loss
    assert _better(_rank_key("kaggle_dice", val_kaggle_dice=0.8, val_loss=0.5),
                   _rank_key("kaggle_dice", val_kaggle_dice=0.7, val_loss=0.1))
    assert _better(_rank_key("kaggle_dice", val_kaggle_dice=0.8, val_loss=0.1),
                   _rank_key("kaggle_dice", val_kaggle_dice=0.8, val_loss=0.2))
    # an epoch that only equals the best is not an improvement (early stopping keeps counting, the
    # best checkpoint is kept)
    same = _rank_key("kaggle_dice", val_kaggle_dice=0.8, val_loss=0.1)
    assert not _better(same, list(same))
    assert _better(same, None)


def test_a_top_k_entry_must_name_a_file_in_the_checkpoint_folder():
    # top-k files are 'epoch-NNN.pt' in checkpoints/: one replaced by a better epoch is deleted, so an
    # entry that only starts like one ('epoch-001.pt/../../x') would delete a file outside the run.
    import pytest

    from pneumoseg.errors import DataFormatError
    from pneumoseg.train.checkpoint import check_resume_state

    model = nn.Linear(2, 1)

    def state(file: str) -> dict:
        return {"model": model.state_dict(), "progress": {"epoch": 1},
                "top_k": [{"score": 0.5, "key": [0.5, 0.0], "epoch": 1, "file": file}]}

    check_resume_state(state("epoch-001.pt"), model, "last.pt")
    check_resume_state(state("epoch-1234.pt"), model, "last.pt")
    for bad in ("epoch-001.pt/../../victim", "epoch-001.pt.bak", "../epoch-001.pt", "epoch-01.pt"):
        with pytest.raises(DataFormatError, match="top_k"):
            check_resume_state(state(bad), model, "last.pt")


def test_checkpoint_weights_are_the_ema_ones_when_the_run_kept_an_ema():
    # "the EMA weights when it has them (ema=None) or when ema=True (then they must exist), else the
    # trained weights"
    import pytest

    from pneumoseg.errors import InvalidInputError
    from pneumoseg.train.checkpoint import checkpoint_state_dict

    trained, averaged = {"w": torch.zeros(2)}, {"w": torch.ones(2)}
    with_ema = {"model": trained, "ema": {"decay": 0.9, "updates": 3, "weights": averaged}}
    without = {"model": trained, "ema": None}
    assert checkpoint_state_dict(with_ema)["w"].tolist() == [1.0, 1.0]
    assert checkpoint_state_dict(with_ema, ema=True)["w"].tolist() == [1.0, 1.0]
    assert checkpoint_state_dict(with_ema, ema=False)["w"].tolist() == [0.0, 0.0]
    assert checkpoint_state_dict(without)["w"].tolist() == [0.0, 0.0]
    with pytest.raises(InvalidInputError, match="no EMA"):
        checkpoint_state_dict(without, ema=True)
