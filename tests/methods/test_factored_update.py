"""The factored update (``delta_factors``): LoRA and the token-routed methods add left @ right straight
into the base output with one in-place addmm_ (no (N, d_out) temporary, no separate add), give the same
output and gradients as base + adapter_forward, and fall back to a plain add where in place is not
possible (adapter dtype differs from the base's) or not wanted (adapter_forward swapped on the instance,
as the benchmark's loop variant does)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import method_cases
import mtpeft
from mtpeft.lib.core.context import Route, RoutingState
from mtpeft.lib.core.layer import AdaptedLayer

pytestmark = pytest.mark.usefixtures("single_thread")

# Every registered method that gives its update as factors and reads no task ids: LoRA and the token-routed ones.
FACTORED = [m for m in method_cases.methods(routing="none") + method_cases.methods(routing="token")
            if method_cases.spec(m).layer_class.delta_factors is not AdaptedLayer.delta_factors]


class OpLog(TorchDispatchMode):
    """Names and output shapes of every aten op dispatched."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else ()
        self.ops.append((func.overloadpacket.__name__, shape))
        return out


def make_layer(method: str, tr, **overrides):
    """One adapted nn.Linear(12, 10) with random B: LoRA built here (with dropout, so the fused path
    draws a mask too), the token-routed methods by their shared test helper."""
    if method_cases.spec(method).routing == "token":
        return tr.standalone_layer(method, d_in=12, d_out=10, **overrides)
    torch.manual_seed(0)
    cfg = mtpeft.LoraConfig(r=4, lora_dropout=0.1, target_modules=["probe"], **overrides)
    layer = mtpeft.lib.config.get_layer_class("lora")(torch.nn.Linear(12, 10), cfg, module_name="probe",
                                                  routing=RoutingState())
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)
    return layer


def forward(layer, x):
    with layer.routing.scope(None, None, record=False):
        return layer(x)


@pytest.mark.parametrize("method", FACTORED)
def test_update_accumulates_into_the_base_output(method, tr):
    layer = make_layer(method, tr).train()
    x = torch.randn(3, 7, 12, requires_grad=True)
    torch.manual_seed(0)
    with OpLog() as log:
        got = forward(layer, x)
    n = 3 * 7
    assert ("addmm_", (n, 10)) in log.ops, log.ops
    assert not [op for op in log.ops if op[0] in ("add", "add_") and op[1] in ((n, 10), (3, 7, 10))], log.ops
    # The same as the base output plus adapter_forward, outputs and gradients.
    torch.manual_seed(0)
    want = layer.base_layer(x) + layer.adapter_forward(x, Route(None, None, False))
    torch.testing.assert_close(got, want)
    params = [p for p in layer.parameters() if p.requires_grad]
    cot = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, [x] + params, cot), torch.autograd.grad(want, [x] + params, cot)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("method", ["lora", "moelora"])
def test_falls_back_to_a_plain_add(method, tr):
    x = torch.randn(2, 5, 12)
    bf16 = make_layer(method, tr, adapter_dtype="bfloat16").eval()
    with OpLog() as log:
        out = forward(bf16, x)
    assert out.dtype == torch.float32 and "addmm_" not in [op for op, _ in log.ops]
    swapped = make_layer(method, tr).eval()
    swapped.adapter_forward = lambda x, route: torch.zeros(*x.shape[:-1], 10)
    torch.testing.assert_close(forward(swapped, x), swapped.base_layer(x))  # the swapped update is used
