"""The per-block trim hook of ``checkpointed`` (issue 16) under ``compile_blocks`` (``--compile``): no graph break."""

import torch
from torch import nn

from lorakit.app.blocks import _trim_after, compile_blocks


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2))

    def forward(self, x):
        for b in self.layers:
            x = b(x)
        return x


def test_trim_hook_adds_no_graph_break_under_compile():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    net, x = Net(), torch.randn(3, 8, requires_grad=True)
    expected = x.double()
    for b in net.layers:  # float64 reference, computed by hand
        expected = torch.tanh(expected @ b[0].weight.double().T + b[0].bias.double())
    hooks = [b.register_forward_hook(_trim_after) for b in net.layers]  # what checkpointed(model, True) adds
    with compile_blocks(net):
        out = net(x)
        out.sum().backward()
    for h in hooks:
        h.remove()
    assert dict(counters["graph_break"]) == {}
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    assert x.grad is not None
