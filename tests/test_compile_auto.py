"""``--compile``'s default, "auto" (issue 18): the blocks compile only when the run's remaining steps repay
the compilation; the decision is printed, kept for a resume, and a compilation's measured cost is kept for
the next run. Values below are worked by hand from the constants."""

import json

import pytest
from torch import nn

from lorakit.app import autocompile as C


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(C, "cxx_compiler", lambda: "g++")
    return tmp_path / "cache"


def test_compile_pays_by_hand():
    assert (C.COMPILE_GAIN, C.COMPILE_SECONDS, C.PROBE_STEPS) == (0.10, 75.0, 4)
    on, why = C.compile_pays(1.7, 296, 75.0, False)  # the default job: 296 x 1.7 x 0.1 = 50.3 s <= 75 s
    assert not on and why == "296 steps left x 1.70 s x 10% = about 50 s saved <= about 75 s to compile (assumed)"
    on, why = C.compile_pays(1.7, 1000, 75.0, True)  # 170 s > 75 s
    assert on and why.endswith("about 170 s saved > about 75 s to compile (measured here before)")
    assert C.compile_pays(1.0, 151, 15.0, True)[0] and not C.compile_pays(1.0, 150, 15.0, True)[0]  # 15.1 > 15
    assert "about 0.6 s saved > about 0.4 s" in C.compile_pays(0.1, 60, 0.4, True)[1]  # small figures keep a decimal


def _compiled(net) -> list[bool]:
    return [b._compiled_call_impl is not None for b in net.layers]


def _probe(switch, seconds, total):
    for step in range(1, C.PROBE_STEPS + 1):
        switch.after_step(step, 99.0 if step == 1 else seconds, total - step)  # step 1's warm-up is not counted


@pytest.mark.parametrize("seconds,total,expect", [(2.0, 1004, True), (2.0, 104, False)])
def test_auto_decides_after_the_probe_steps(seconds, total, expect, cache):
    net, said = Net(), []
    with C.CompileSwitch(net, "auto", said.append) as switch:
        for step in range(1, C.PROBE_STEPS):
            switch.after_step(step, 99.0 if step == 1 else seconds, total - step)
            assert not switch.compiled and not said and switch.decision is None and _compiled(net) == [False] * 3
        switch.after_step(C.PROBE_STEPS, seconds, total - 4)  # 1000 x 2 x 0.1 = 200 s > 75; 100 x 2 x 0.1 = 20 <= 75
        assert switch.compiled is expect and _compiled(net) == [expect] * 3
        assert switch.decision == (5 if expect else C.OFF)
        assert len(said) == 1 and said[0].startswith(f"torch.compile: {'on' if expect else 'off'} (auto): "
                                                     f"{total - 4} steps left x 2.00 s")
        assert switch.compiled_from is None  # step 4 itself ran eagerly
        switch.after_step(5, 32.0, total - 5)  # compiled: this step paid 32 - 2 = 30 s of compilation
        for step in range(6, 12):  # decided once
            switch.after_step(step, 1000.0, 10 ** 6)
        assert len(said) == 1 and switch.compiled is expect and switch.compiled_from == (5 if expect else None)
    assert _compiled(net) == [False] * 3  # eager again after the run
    times = json.loads((cache / "compile_times.json").read_text()) if expect else {}
    assert list(times.values()) == ([30.0] if expect else [])


def test_a_resumed_run_keeps_the_decision():
    net, said = Net(), []
    with C.CompileSwitch(net, "auto", said.append, decision=5) as switch:  # resumed at step 6 of a run that compiled
        assert switch.compiled and _compiled(net) == [True] * 3
        switch.after_step(7, 2.0, 10 ** 6)
        assert switch.compiled_from == 5  # the run's first compiled step, before this process's first
    with C.CompileSwitch(net, "auto", said.append, decision=C.OFF) as switch:  # decided off: stays off
        switch.after_step(7, 100.0, 10 ** 6)
        assert not switch.compiled and switch.compiled_from is None
    with C.CompileSwitch(net, "auto", said.append) as switch:  # resumed at step 2: decides after step 4 all the same
        switch.after_step(3, 2.0, 1001)
        switch.after_step(4, 2.0, 1000)
        assert switch.decision == 5 and switch.compiled
    assert said[:2] == ["torch.compile: on (auto, decided after step 4 of this run)",  # a resumed run's log says so
                        "torch.compile: off (auto, decided after step 4 of this run); --compile forces it"]
    assert len(said) == 3 and "1000 steps left x 2.00 s" in said[2]


@pytest.mark.parametrize("steps,line", [
    (3, "torch.compile: off (auto): 3 steps end before the decision after step 4; --compile forces it"),
    (4, "torch.compile: off (auto): 4 steps end before the decision after step 4; --compile forces it"),
    (5, None), (None, None)])
def test_a_run_too_short_for_the_decision_says_it_stays_eager(steps, line):
    """A run of 4 steps or fewer never reached the decision, and its log never mentioned torch.compile."""
    net, said = Net(), []
    with C.CompileSwitch(net, "auto", said.append, steps=steps) as switch:
        assert said == ([line] if line else [])  # said at the start (a longer run says its decision after step 4)
        for step in range(1, min(steps or 4, 4) + 1):
            switch.after_step(step, 2.0, (steps or 4) - step)
        assert not switch.compiled
    if steps == 5:  # the decision after step 4, with one step left: off
        assert len(said) == 1 and said[0].startswith("torch.compile: off (auto): 1 steps left x 2.00 s")
    else:
        assert said == ([line] if line else [])


def test_the_measured_cost_decides_the_next_run(cache):
    net, said = Net(), []
    with C.CompileSwitch(net, "auto", said.append) as switch:
        _probe(switch, 2.0, 1004)
        switch.after_step(5, 502.0, 999)  # a 500 s compilation
    with C.CompileSwitch(Net(), "auto", said.append) as switch:  # same block: 1000 x 2 x 0.1 = 200 s <= 500 s
        _probe(switch, 2.0, 1004)
        assert not switch.compiled and "about 500 s to compile (measured here before)" in said[-1]
    for bad in ("not json", "[" * 100000, "[1]", json.dumps({C.block_key(net): v for v in ["x"]}),
                json.dumps({C.block_key(net): -30}), json.dumps({C.block_key(net): True})):
        (cache / "compile_times.json").write_text(bad)  # unreadable or senseless: the assumed cost again
        with C.CompileSwitch(Net(), "auto", said.append) as switch:
            _probe(switch, 2.0, 1004)
            assert switch.compiled and "about 75 s to compile (assumed)" in said[-1]
            switch.after_step(5, 2.5, 999)  # measured 0.5 s: kept as at least 1 s, the bad file replaced
        assert json.loads((cache / "compile_times.json").read_text()) == {C.block_key(net): 1.0}


def test_forced_on_records_its_cost_off_and_not_allowed(monkeypatch, cache):
    net, said = Net(), []
    with C.CompileSwitch(net, True, said.append) as switch:
        assert switch.compiled and _compiled(net) == [True] * 3
        _probe(switch, 2.0, 100)  # step 1 took 99 s, the next ones 2 s: 97 s of compilation
        assert switch.compiled_from == 1
    assert json.loads((cache / "compile_times.json").read_text()) == {C.block_key(net): 97.0}
    assert said == ["torch.compile: on (--compile): the transformer blocks, from the first step"]
    del said[:]
    with C.CompileSwitch(net, False, said.append) as switch:
        _probe(switch, 100.0, 10 ** 6)
        assert not switch.compiled and not said and switch.compiled_from is None
    with C.CompileSwitch(net, "auto", said.append, allowed=False) as switch:
        _probe(switch, 100.0, 10 ** 6)
        assert not switch.compiled and said == ["torch.compile: off (auto): not measured with a quantised base or "
                                                "several processes; --compile forces it"]
    monkeypatch.setattr(C, "cxx_compiler", lambda: None)
    with C.CompileSwitch(net, "auto", said.append) as switch:
        _probe(switch, 100.0, 10 ** 6)
        assert not switch.compiled and "no C++ compiler found" in said[-1]
    with C.CompileSwitch(net, "auto", said.append) as switch:  # no steps left after the probe: nothing to decide
        _probe(switch, 100.0, C.PROBE_STEPS)
        assert switch.decision is None and len(said) == 2


def test_cxx_compiler_reads_cxx_and_the_path(monkeypatch, tmp_path):
    monkeypatch.undo()
    from lorakit.app import autocompile

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    assert autocompile.cxx_compiler() is None
    tool = tmp_path / "my-c++"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    monkeypatch.setenv("CXX", "my-c++")
    assert autocompile.cxx_compiler() == "my-c++"
