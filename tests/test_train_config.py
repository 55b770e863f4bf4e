"""The training config: YAML reading, --set overrides typed by the field, validation naming the field,
the built-in recipes."""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("yaml")

from pneumoseg.train.config import (  # noqa: E402
    ConfigError,
    StageConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    describe_config,
    list_recipes,
    load_config,
    load_recipe,
    recipe_mapping,
)


def test_recipes_are_listed_described_and_valid():
    recipes = list_recipes()
    assert set(recipes) == {"siim-1st", "classifier", "demo"}
    assert all(text for text in recipes.values())
    for name in recipes:
        cfg = load_recipe(name)
        assert isinstance(cfg, TrainConfig)
        assert config_from_dict(cfg.to_dict()) == cfg  # every field survives the round trip


def test_siim_1st_recipe_is_the_winners():
    cfg = load_recipe("siim-1st")
    assert (cfg.task, cfg.data.image_size, cfg.model.arch, cfg.model.encoder) == ("segmentation", 1024, "unet", "resnet34")
    assert (cfg.optimizer.name, cfg.optimizer.weight_decay, cfg.batch_size, cfg.clip_grad_norm) == ("adam", 5e-6, 2, 0.1)
    assert (cfg.loss.bce, cfg.loss.dice, cfg.loss.focal, cfg.loss.focal_gamma, cfg.loss.dice_smooth) == (3, 1, 4, 2, 1e-6)
    assert not cfg.loss.per_image_dice
    stages = cfg.stage_list()
    assert [s.positive_ratio for s in stages] == [0.8, 0.6, 0.4]
    assert [s.lr for s in stages] == [1e-4, 1e-5, 1e-5]
    assert stages[0].scheduler.name == "plateau" and stages[0].scheduler.factor == 0.1 and stages[0].scheduler.patience == 2
    assert all(s.scheduler.name == "cosine" and s.scheduler.t_max == 8 and s.scheduler.eta_min == 1e-7 for s in stages[1:])
    assert [s.init for s in stages] == ["last", "best", "best"]
    assert cfg.checkpoint.keep_top_k == 3 and cfg.data.folds == 5 and cfg.monitor == "triplet_dice"
    assert (cfg.augment.hflip, cfg.augment.shift, cfg.augment.scale, cfg.augment.rotate) == (0.5, 0.0625, 0.1, 45.0)


def test_classifier_and_demo_recipes():
    cls = load_recipe("classifier")
    assert (cls.task, cls.model.encoder, cls.data.image_size, cls.loss.pos_weight) == ("classification", "densenet121", 512, 2.0)
    assert (cls.optimizer.name, cls.optimizer.lr, cls.scheduler.name, cls.monitor) == ("adam", 3e-4, "plateau", "auc")
    demo = load_recipe("demo", data={"root": "somewhere"})
    assert demo.data.root == "somewhere" and demo.model.encoder == "resnet_tiny"
    stage1 = demo.classifier_config()
    assert stage1.task == "classification" and stage1.data.root == "somewhere"  # data inherited
    assert stage1.data.fold == demo.data.fold and stage1.data.split_seed == demo.data.split_seed


def test_overrides_are_typed_by_the_field():
    raw = recipe_mapping("siim-1st")
    cfg = config_from_dict(apply_overrides(raw, [
        "epochs=3", "optimizer.lr=3e-4", "channels_last=true", "ema=0.999", "clip_grad_norm=null",
        "model.decoder_channels=[64, 32, 16, 16, 8]", "stages.1.lr=2e-5", "stages.0.scheduler.patience=4",
        "positive_ratio=[0.8, 0.4]", "data.root=/data/siim", "model.attention=scse", "validation.min_areas=[0, 100]",
    ]))
    assert cfg.epochs == 3 and cfg.optimizer.lr == 3e-4 and cfg.channels_last is True and cfg.ema == 0.999
    assert cfg.clip_grad_norm is None and cfg.model.decoder_channels == [64, 32, 16, 16, 8]
    assert cfg.stages[1].lr == 2e-5 and cfg.stages[0].scheduler.patience == 4
    assert cfg.positive_ratio == [0.8, 0.4] and cfg.data.root == "/data/siim" and cfg.model.attention == "scse"
    assert cfg.validation.min_areas == [0, 100]
    demo = config_from_dict(apply_overrides(recipe_mapping("demo"), ["classifier.epochs=2", "classifier.model.encoder=resnet34"]))
    assert demo.classifier_config().epochs == 2 and demo.classifier_config().model.encoder == "resnet34"
    assert apply_overrides({}, ["stages=[{epochs: 2}, {epochs: 1, init: best}]"])["stages"][1]["init"] == "best"


@pytest.mark.parametrize("override, field, words", [
    ("optimizer.lrr=1", "optimizer.lrr", "did you mean 'lr'"),
    ("epochs=1.5", "epochs", "integer"),
    ("channels_last=maybe", "channels_last", "true or false"),
    ("optimizer.lr=fast", "optimizer.lr", "number"),
    ("stages.x.lr=1", "stages.x", "list index"),
    ("stages.5.lr=1e-4", "stages.5", "past the list's end"),
    ("epochs.x=1", "epochs.x", "no sub-fields"),
])
def test_override_errors_name_the_field(override, field, words):
    with pytest.raises(ConfigError) as err:
        config_from_dict(apply_overrides(recipe_mapping("siim-1st"), [override]))
    assert field in str(err.value) and words in str(err.value)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["epochs"])
    with pytest.raises(ConfigError, match="dotted key"):
        apply_overrides({}, ["a..b=1"])


@pytest.mark.parametrize("raw, field, words", [
    ({"optimizer": {"lr": -1}}, "optimizer.lr", "> 0"),
    ({"optimizer": {"name": "adan"}}, "optimizer.name", "did you mean 'adam'"),
    ({"task": "detection"}, "task", "segmentation, classification"),
    ({"epochs": 0}, "epochs", "> 0"),
    ({"epochs": True}, "epochs", "integer"),
    ({"seed": 2**64}, "seed", "at most 2**63 - 1"),
    ({"data": {"split_seed": 2**70}}, "data.split_seed", "at most 2**63 - 1"),
    ({"batch_size": 10**30}, "batch_size", "at most 2**63 - 1"),
    ({"data": {"image_size": 100}}, "data.image_size", "multiple of 32"),
    ({"data": {"fold": 5, "folds": 5}}, "data.fold", "[0, 4]"),
    ({"data": {"chest_crop": True}}, "data.chest_crop", "classifiers only"),
    ({"model": {"decoder_channels": [1, 2]}}, "model.decoder_channels", "5 integers"),
    ({"model": {"batchnorm": "group"}}, "model.batchnorm", "batch, sync, frozen"),
    ({"positive_ratio": 1.5}, "positive_ratio", "[0, 1]"),
    ({"positive_ratio": [0.8, 0.4, 0.2]}, "positive_ratio", "[start, end] pair"),
    ({"ema": 1.0}, "ema", "(0, 1)"),
    ({"device": "gpu"}, "device", "cuda:N"),
    ({"stages": [{"init": "best"}]}, "stages.0.init", "no previous stage"),
    ({"stages": [{"epochs": -2}]}, "stages.0.epochs", "> 0"),
    ({"stages": [{"scheduler": {"name": "step"}}]}, "stages.0.scheduler.name", "plateau"),
    ({"augment": {"gamma": [1.2, 0.8]}}, "augment.gamma", "range"),
    ({"validation": {"tops": [1.5]}}, "validation.tops", "[0, 1]"),
    ({"validation": {"monitor": "auc"}}, "validation.monitor", "classification head"),
    ({"task": "classification", "validation": {"monitor": "triplet_dice"}}, "validation.monitor", "auc or loss"),
    ({"task": "classification", "classifier": {}}, "classifier", "cannot have"),
    ({"classifier": {}, "classifier_dir": "x"}, "classifier_dir", "not both"),
    ({"classifier": {"epochs": "two"}}, "classifier.epochs", "integer"),
    ({"classifier": {"data": {"image_size": 8}}}, "classifier.data.image_size", "at least 32"),
    ({"classifier": {"task": "segmentation"}}, "classifier.task", "classification"),
    ({"mdoel": {}}, "mdoel", "did you mean 'model'"),
    ({"data": []}, "data", "mapping"),
])
def test_validation_names_the_bad_field(raw, field, words):
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw, source="run.yaml")
    text = str(err.value)
    assert f"config field {field}" in text and words in text


def test_yaml_files(tmp_path):
    good = tmp_path / "run.yaml"
    good.write_text("task: classification\nmodel: {encoder: resnet_tiny}\nepochs: 2\n")
    cfg = load_config(good, ["batch_size=4"])
    assert (cfg.task, cfg.model.encoder, cfg.epochs, cfg.batch_size) == ("classification", "resnet_tiny", 2, 4)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("epochs: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(tmp_path / "empty.yaml") == TrainConfig()
    with pytest.raises(ConfigError, match="unknown recipe 'dmo'.*did you mean 'demo'"):
        load_recipe("dmo")


def test_stage_list_fills_from_the_top_level():
    cfg = config_from_dict({"epochs": 4, "optimizer": {"lr": 1e-3}, "positive_ratio": 0.5, "early_stopping": 3,
                            "scheduler": {"name": "cosine"},
                            "stages": [{}, {"epochs": 2, "lr": 1e-4, "init": "best", "positive_ratio": [0.6, 0.4]}]})
    a, b = cfg.stage_list()
    assert (a.name, a.epochs, a.lr, a.positive_ratio, a.early_stopping, a.scheduler.name) == ("stage0", 4, 1e-3, 0.5, 3, "cosine")
    assert (b.name, b.epochs, b.lr, b.positive_ratio, b.init) == ("stage1", 2, 1e-4, [0.6, 0.4], "best")
    assert TrainConfig().stage_list() == [StageConfig(name="stage0", epochs=10, lr=1e-4, scheduler=TrainConfig().scheduler,
                                                      positive_ratio=None, early_stopping=None, init="last")]


def test_every_field_is_documented():
    rows = describe_config()
    names = {name for name, _, _ in rows}
    assert all(doc for _, _, doc in rows), [n for n, _, d in rows if not d]
    for required in ("data.root", "data.cache", "optimizer.lr", "scheduler.warmup", "loss.focal", "amp", "ema",
                     "stages.N.init", "classifier", "checkpoint.every_steps", "validation.min_component_areas"):
        assert required in names
    # the documented defaults are the dataclasses' defaults
    assert dict((n, d) for n, d, _ in rows)["optimizer.lr"] == repr(TrainConfig().optimizer.lr)
    assert len(rows) >= sum(1 for _ in dataclasses.fields(TrainConfig))


def test_yaml_reads_exponents_without_a_dot_as_numbers(tmp_path):
    """`lr: 1e-4` is how everyone writes a learning rate; PyYAML (YAML 1.1) read it as the string
    '1e-4' and the config refused it as "must be a number"."""
    path = tmp_path / "run.yaml"
    path.write_text("optimizer:\n  lr: 1e-4\n  weight_decay: 5E-6\nvalidation:\n  tops: [.25, 5e-1]\n")
    cfg = load_config(path, ["scheduler.eta_min=1e-7"])
    assert cfg.optimizer.lr == 1e-4 and cfg.optimizer.weight_decay == 5e-6
    assert list(cfg.validation.tops) == [0.25, 0.5]
    path.write_text('optimizer:\n  lr: "1e-4"\n')  # quoted: a string, still refused by the number field
    with pytest.raises(ConfigError, match="optimizer.lr"):
        load_config(path)


def test_yaml_alias_bombs_and_recursive_aliases_are_refused_at_once(tmp_path):
    """Nine lines of nested aliases (the "billion laughs") loaded in microseconds, then took 24 GB
    and 90 s when the config was checked; a config is a file users download with a model."""
    levels = ["a: &l0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    path = tmp_path / "bomb.yaml"
    path.write_text("epochs:\n" + "".join(f"  {line}\n" for line in levels))
    with pytest.raises(ConfigError, match="aliases expand to more than 100,000 values"):
        load_config(path)
    path.write_text("epochs: &a [1, *a]\n")
    with pytest.raises(ConfigError, match="recursive YAML value"):
        load_config(path)
    # aliases used the ordinary way (one stage's settings reused) still load
    path.write_text("stages:\n  - &s {epochs: 1, lr: 1.0e-4}\n  - *s\n")
    assert [s.epochs for s in load_config(path).stage_list()] == [1, 1]
