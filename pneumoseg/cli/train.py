"""``pneumoseg train``: train a classifier or a segmenter into a run folder that ends up as a model
directory (``pneumoseg.train``)."""

from __future__ import annotations

import argparse
import os
import sys

from .types import add_no_progress, path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a classifier or segmenter (a YAML config or a built-in recipe)",
        description="Train into RUN, which ends up as a model directory (config, weights, thresholds, metrics) "
                    "beside its checkpoints, metrics.csv and plots. Multi-GPU: torchrun --nproc_per_node=K -m "
                    "pneumoseg train CONFIG.yaml --out RUN.")
    p.add_argument("config", nargs="?", type=path, metavar="CONFIG.yaml", help="a training config (YAML)")
    p.add_argument("--recipe", metavar="NAME", help="a built-in recipe instead of a config (see --list-recipes)")
    p.add_argument("--data", type=path, metavar="DIR", help="the DICOM folder (sets data.root)")
    p.add_argument("--csv", type=path, metavar="FILE", help="the RLE CSV (sets data.csv; default DIR/train-rle.csv, else DIR/stage_2_train.csv)")
    p.add_argument("--cache", type=path, metavar="DIR", help="a `pneumoseg data cache` folder (sets data.cache)")
    p.add_argument("--out", type=path, metavar="RUN",
                   help="the run folder: new, empty or pneumoseg's earlier output (with --resume: the run to continue)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optimizer.lr=3e-4 --set stages.0.epochs=2 (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in RUN from its last checkpoint (its config.yaml unless a config is given)")
    p.add_argument("--force", action="store_true", help="write into RUN even if it holds files pneumoseg did not write")
    p.add_argument("--list-recipes", action="store_true", help="print the built-in recipes and exit")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--fields", action="store_true", help="print every config field with its default and meaning, and exit")
    add_no_progress(p)
    p.set_defaults(run=run)


def _resolve(args: argparse.Namespace):
    from ..errors import InvalidInputError
    from ..train.config import apply_overrides, config_from_dict, read_config_mapping, recipe_mapping

    if args.config is not None and args.recipe is not None:
        raise InvalidInputError("give either CONFIG.yaml or --recipe, not both")
    if args.config is not None:
        raw, source = read_config_mapping(args.config), str(args.config)
    elif args.recipe is not None:
        raw, source = recipe_mapping(args.recipe), f"recipe {args.recipe}"
    elif args.resume and args.out is not None:
        saved = args.out / "config.yaml"
        if not saved.is_file():
            raise InvalidInputError(f"{args.out}: no config.yaml to resume with; give the run's CONFIG.yaml or --recipe")
        raw, source = read_config_mapping(saved), str(saved)
    else:
        raise InvalidInputError("give a CONFIG.yaml or --recipe NAME (see --list-recipes)")
    data = dict(raw.get("data") or {})
    for flag, key in (("data", "root"), ("csv", "csv"), ("cache", "cache")):
        value = getattr(args, flag)
        if value is not None:
            data[key] = str(value)
    raw["data"] = data
    return config_from_dict(apply_overrides(raw, args.overrides), source=source)


def run(args: argparse.Namespace) -> int:
    from ..errors import InvalidInputError

    if args.list_recipes:
        from ..train.config import list_recipes

        recipes = list_recipes()
        width = max(len(n) for n in recipes)
        for name, text in recipes.items():
            print(f"{name:<{width}}  {text}")
        return 0
    if args.fields:
        from ..train.config import describe_config

        for name, default, doc in describe_config():
            print(f"{name} = {default}\n    {doc}")
        return 0
    cfg = _resolve(args)
    if args.print_config:
        import yaml

        sys.stdout.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    if args.out is None:
        raise InvalidInputError("--out RUN is required: the folder the run writes")
    from .._fs import OutputKind, check_output_folder
    from ..train.engine import run_inputs, train

    # Said now, not after the data set has loaded: the folder is prepared once everything else is checked.
    check_output_folder(args.out, overwrite=args.force, what=OutputKind.TRAINING_RUN, resume=args.resume,
                        inputs=run_inputs(cfg))

    try:
        result = train(cfg, args.out, resume=args.resume, overwrite=args.force, progress=not args.no_progress)
    except Exception as exc:
        from ..errors import PneumosegError, out_of_memory_line

        first_line = out_of_memory_line(exc)
        if first_line is None:
            raise
        raise PneumosegError(f"out of memory training at batch_size {cfg.batch_size}, image size "
                             f"{cfg.data.image_size} ({first_line}); lower batch_size or data.image_size (--set), or "
                             f"train on a machine with more memory") from None
    if os.environ.get("RANK", "0") not in ("", "0"):
        return 0
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    if result.classifier is not None:
        print(_summary(result.classifier, "classifier"))
    print(_summary(result, "segmenter" if cfg.task == "segmentation" else "classifier"))
    print(f"model directory: {result.out} (pneumoseg.json); checkpoints in {result.out / 'checkpoints'}; "
          f"per-epoch metrics in {result.out / 'metrics.csv'}")
    return 0


def _summary(result, what: str) -> str:
    m = result.metrics
    parts = [f"{what}: {m['epochs']} epochs, {m['steps']} steps, best epoch {m['best_epoch']}"]
    if "kaggle_dice" in m:
        parts.append(f"validation Kaggle Dice {m['kaggle_dice']:.4f} (all-empty baseline {m['empty_baseline']:.4f})")
    if m.get("auc") is not None:
        parts.append(f"AUC {m['auc']:.4f}")
    t = result.thresholds
    if what == "segmenter":
        parts.append(f"thresholds top {t.top} min_area {t.min_area} bottom {t.bottom} "
                     f"min_component_area {t.min_component_area}" + (f" gate {t.gate:.3g}" if m.get("gate") else ""))
    else:
        parts.append(f"gate {t.gate:.3g} (sensitivity {m.get('sensitivity', float('nan')):.3f}, "
                     f"specificity {m.get('specificity', float('nan')):.3f})")
    return "; ".join(parts)
