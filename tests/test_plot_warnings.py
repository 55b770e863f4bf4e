"""pneumoseg's plots stay quiet about matplotlib's use of deprecated pyparsing names (matplotlib before
3.10.7 with pyparsing 3.3+, pneumoseg/_matplotlib.py), and only about that.

The old matplotlib is not needed: the warning is raised here as matplotlib's modules raise it (its
category, attributed to a matplotlib module), at import and while a figure is saved. Checked for real
with matplotlib 3.7.5 and pyparsing 3.3.3, where ``import matplotlib`` alone fails under -W error."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest

from pneumoseg._fs import OutputFolder
from pneumoseg._matplotlib import quiet_matplotlib

pyparsing = pytest.importorskip("pyparsing")
DEPRECATION = getattr(pyparsing, "PyparsingDeprecationWarning", None)
if DEPRECATION is None:
    pytest.skip("pyparsing before 3.3 has no PyparsingDeprecationWarning", allow_module_level=True)

MESSAGE = "'parseString' deprecated - use 'parse_string'"


def warn_as(module: str, category: type[Warning] = DEPRECATION) -> None:
    """The warning as raised from ``module`` (pyparsing's stacklevel=2 names the caller's module)."""
    warnings.warn_explicit(MESSAGE, category, filename=f"{module.replace('.', '/')}.py", lineno=88, module=module)


def test_only_pyparsings_deprecation_from_matplotlib_is_silenced_and_only_inside():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        before = list(warnings.filters)
        with quiet_matplotlib():
            warn_as("matplotlib._fontconfig_pattern")
            warn_as("matplotlib")
            for module, category in (("pneumoseg.train.logs", DEPRECATION),  # the same warning from elsewhere
                                     ("matplotlib_extra", DEPRECATION),  # a module that only starts alike
                                     ("matplotlib._mathtext", UserWarning),  # matplotlib's other warnings
                                     ("matplotlib._mathtext", DeprecationWarning)):
                with pytest.raises(category, match="parseString"):
                    warn_as(module, category)
        assert warnings.filters == before  # the caller's filters, as they were
        with pytest.raises(DEPRECATION):
            warn_as("matplotlib._fontconfig_pattern")


def test_the_filter_is_gone_after_an_exception_inside():
    before = list(warnings.filters)
    with pytest.raises(KeyError), quiet_matplotlib():
        raise KeyError("plotting failed")
    assert warnings.filters == before


class WarnsAtImport:
    """A meta path finder standing in for an old matplotlib: ``import matplotlib`` raises the warning
    from matplotlib's module, then fails (so the real matplotlib is never imported twice)."""

    def find_spec(self, name, path=None, target=None):
        if name == "matplotlib":
            warn_as("matplotlib._fontconfig_pattern")
            raise ModuleNotFoundError("no matplotlib here", name="matplotlib")
        return None


@pytest.fixture
def matplotlib_warns_at_import(monkeypatch):
    monkeypatch.delitem(sys.modules, "matplotlib", raising=False)
    monkeypatch.setattr(sys, "meta_path", [WarnsAtImport(), *sys.meta_path])


@pytest.fixture
def matplotlib_warns_when_saving(monkeypatch):
    """matplotlib's fonts are parsed when a figure is drawn: the warning comes again on first use."""
    with quiet_matplotlib():  # the test's own import, under an old matplotlib, warns too
        pytest.importorskip("matplotlib")
        from matplotlib.figure import Figure

    savefig = Figure.savefig
    calls = []

    def warning_savefig(self, *args, **kwargs):
        calls.append(1)
        warn_as("matplotlib._fontconfig_pattern")
        return savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", warning_savefig)
    return calls


def training_history():
    return [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.2 / e, "val_triplet_dice": 0.2 * e} for e in (1, 2, 3)]


def labelled_scores():
    labels = np.array([0, 1, 0, 1, 1, 0], dtype=bool)
    scores = np.array([0.1, 0.8, 0.4, 0.35, 0.9, 0.2])
    return labels, scores


def an_evaluation():
    from pneumoseg.infer.evaluation import evaluate

    truth = {"a": ["1 4"], "b": ["-1"], "c": ["3 2"], "d": ["-1"]}
    pred = {"a": ["1 3"], "b": ["-1"], "c": ["-1"], "d": ["5 1"]}
    return evaluate(pred, truth, scores={"a": 0.9, "b": 0.2, "c": 0.4, "d": 0.6}, bootstrap=0)


def test_training_plots_with_the_warning_at_import(tmp_path, matplotlib_warns_at_import):
    from pneumoseg.train.logs import write_plots

    with OutputFolder(tmp_path / "run") as folder:
        written, note = write_plots(folder, training_history())
    assert written == [] and "matplotlib is not installed" in note


def test_evaluation_plots_with_the_warning_at_import(tmp_path, matplotlib_warns_at_import):
    from pneumoseg.infer.evaluation import write_evaluation_plots

    ev = an_evaluation()
    with OutputFolder(tmp_path / "evaluation") as folder:
        assert write_evaluation_plots(ev, folder) == []


def test_training_plots_with_the_warning_in_use(tmp_path, matplotlib_warns_when_saving):
    from pneumoseg.train.logs import write_plots

    labels, scores = labelled_scores()
    with OutputFolder(tmp_path / "run") as folder:
        written, note = write_plots(folder, training_history(), labels=labels, scores=scores,
                                    predictions=scores > 0.5)
    assert note is None and "plots/loss.png" in written and len(matplotlib_warns_when_saving) == len(written)
    for name in written:
        assert (tmp_path / "run" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(DEPRECATION):  # the scope ended with the call
        warn_as("matplotlib._fontconfig_pattern")


def test_evaluation_plots_with_the_warning_in_use(tmp_path, matplotlib_warns_when_saving):
    from pneumoseg.infer.evaluation import write_evaluation_plots

    ev = an_evaluation()
    with OutputFolder(tmp_path / "evaluation") as folder:
        written = write_evaluation_plots(ev, folder)
    assert "confusion_matrix.png" in written and len(matplotlib_warns_when_saving) == len(written)
    for name in written:
        assert (tmp_path / "evaluation" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(DEPRECATION):
        warn_as("matplotlib._fontconfig_pattern")
