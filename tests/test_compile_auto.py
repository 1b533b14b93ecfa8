"""``--compile``'s default, "auto" (issue 18): the blocks compile only when the run's remaining steps repay
the compilation; the decision is printed, and a compilation's measured cost is kept for the next run.
Values below are worked by hand from the constants."""

import json

import pytest
import torch
from torch import nn

from lorakit.app import blocks as B


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_compile_pays_by_hand():
    assert (B.COMPILE_GAIN, B.COMPILE_SECONDS, B.PROBE_STEPS) == (0.10, 75.0, 4)
    on, why = B.compile_pays(1.7, 296, 75.0, False)  # the default job: 296 x 1.7 x 0.1 = 50.3 s <= 75 s
    assert not on and why == "296 steps left x 1.70 s x 10% = about 50 s saved <= about 75 s to compile (assumed)"
    on, why = B.compile_pays(1.7, 1000, 75.0, True)  # 170 s > 75 s
    assert on and why.endswith("about 170 s saved > about 75 s to compile (measured here before)")
    assert B.compile_pays(1.0, 151, 15.0, True)[0] and not B.compile_pays(1.0, 150, 15.0, True)[0]  # 15.1 > 15


def _compiled(net) -> list[bool]:
    return [b._compiled_call_impl is not None for b in net.layers]


def _probe(switch, seconds, left):
    for i in range(B.PROBE_STEPS):
        switch.after_step(99.0 if i == 0 else seconds, left)  # the first step's warm-up is not counted


@pytest.mark.parametrize("seconds,left,expect", [(2.0, 1000, True), (2.0, 100, False)])
def test_auto_decides_after_the_probe_steps(seconds, left, expect, cache):
    net, said = Net(), []
    with B.CompileSwitch(net, "auto", said.append) as switch:
        for i in range(B.PROBE_STEPS - 1):
            switch.after_step(99.0 if i == 0 else seconds, left)
            assert not switch.compiled and not said and _compiled(net) == [False] * 3
        switch.after_step(seconds, left)  # 1000 x 2 x 0.1 = 200 s > 75 s; 100 x 2 x 0.1 = 20 s <= 75 s
        assert switch.compiled is expect and _compiled(net) == [expect] * 3
        assert len(said) == 1 and said[0].startswith(f"torch.compile: {'on' if expect else 'off'} (auto): {left} steps "
                                                     "left x 2.00 s")
        switch.after_step(32.0, left - 1)  # compiled: this step paid 32 - 2 = 30 s of compilation
        for _ in range(5):  # decided once
            switch.after_step(1000.0, 10 ** 6)
        assert len(said) == 1 and switch.compiled is expect
    assert _compiled(net) == [False] * 3  # eager again after the run
    times = json.loads((cache / "compile_times.json").read_text()) if expect else {}
    assert list(times.values()) == ([30.0] if expect else [])


def test_the_measured_cost_decides_the_next_run(cache):
    net, said = Net(), []
    with B.CompileSwitch(net, "auto", said.append) as switch:
        _probe(switch, 2.0, 1000)
        switch.after_step(502.0, 999)  # a 500 s compilation
    with B.CompileSwitch(Net(), "auto", said.append) as switch:  # same block: 1000 x 2 x 0.1 = 200 s <= 500 s
        _probe(switch, 2.0, 1000)
        assert not switch.compiled and "about 500 s to compile (measured here before)" in said[-1]
    (cache / "compile_times.json").write_text("not json")  # an unreadable record: the assumed cost again
    with B.CompileSwitch(Net(), "auto", said.append) as switch:
        _probe(switch, 2.0, 1000)
        assert switch.compiled and "about 75 s to compile (assumed)" in said[-1]


def test_forced_on_off_and_not_allowed():
    net, said = Net(), []
    with B.CompileSwitch(net, True, said.append) as switch:
        assert switch.compiled and _compiled(net) == [True] * 3
    with B.CompileSwitch(net, False, said.append) as switch:
        _probe(switch, 100.0, 10 ** 6)
        assert not switch.compiled and not said
    with B.CompileSwitch(net, "auto", said.append, allowed=False) as switch:
        _probe(switch, 100.0, 10 ** 6)
        assert not switch.compiled and len(said) == 1 and "off (auto; not measured" in said[0]
