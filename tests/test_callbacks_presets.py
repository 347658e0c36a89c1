"""Analysis presets (callbacks/presets.py) and evaluate.py's --preset."""

from __future__ import annotations

import inspect

import pytest

import callbacks
import evaluate
from callbacks.base import Analysis
from callbacks.presets import PRESETS, instantiate, preset


def test_full_holds_every_analysis_and_economy_is_a_subset():
    full = {type(cb) for cb in instantiate(PRESETS["full"])}
    every = {
        c
        for c in vars(callbacks).values()
        if inspect.isclass(c) and issubclass(c, Analysis) and c is not Analysis
    }
    assert full == every
    economy = instantiate(PRESETS["economy"])
    assert {type(cb) for cb in economy} < full
    assert PRESETS["none"] == []
    names = [cb.name for cb in instantiate(PRESETS["full"])]
    assert len(names) == len(set(names))
    # one shared schedule: the analysed steps coincide, so cached work is shared
    assert {cb.every_n_steps for cb in economy} == {16}


def test_overrides_and_errors():
    fast = instantiate(preset("economy", every_n_steps=4, schedule="log"))
    assert {(cb.every_n_steps, cb.schedule) for cb in fast} == {(4, "log")}
    assert preset("economy")[0] is not PRESETS["economy"][0]  # a copy: presets stay intact
    with pytest.raises(ValueError, match="unknown analysis preset"):
        preset("cheap")


@pytest.mark.parametrize("name", ["none", "economy", "full"])
def test_evaluate_preset_replaces_the_analyses(monkeypatch, name):
    seen = {}

    def fake_run(*args, **kwargs):
        seen["analyses"] = kwargs["analyses"]
        return {}

    monkeypatch.setattr(evaluate, "run_experiment", fake_run)
    evaluate.cli_main(
        ["--preset", name, "--every", "{symmetry: 0}", "--optimizers", "[{name: sgd, lr: 0.1}]"]
    )
    got = [type(cb).__name__ for cb in seen["analyses"]]
    want = [type(cb).__name__ for cb in instantiate(PRESETS[name]) if cb.name != "symmetry"]
    assert got == want
    with pytest.raises(SystemExit):
        evaluate.cli_main(["--preset", "cheap"])
