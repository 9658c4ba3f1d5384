"""Shared helpers for the token-routed method tests (every method registered with routing="token",
tests/method_cases.py: the package's and the test-defined ones).

Tiny models are built from configs (no downloads) with every dropout of the base off, so that
training mode is deterministic apart from the adapters' own dropout. Tests reach the helpers through
the ``tr`` fixture (``tr.tiny_llama()``, ``tr.make_config("moelora")``, ...) rather than by importing
this file (two conftest modules share the name) and get the methods from the ``method`` fixture.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import mtpeft  # noqa: E402
from mtpeft.lib.core.context import Route, RoutingState  # noqa: E402
from _tiny import N_TASKS, VOCAB, tiny_bert, tiny_gpt2, tiny_llama  # noqa: E402  (the same tiny models)
import method_cases  # noqa: E402

TOKEN_ROUTED = {name: method_cases.spec(name).config_class for name in method_cases.methods(routing="token")}


BUILDERS = {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}


def make_config(method: str, **overrides):
    """The method's test config (MethodSpec.test_config; n_tasks=3, so per-task statistics have a fixed size)."""
    overrides.setdefault("n_tasks", N_TASKS)
    return method_cases.config(method, **overrides)


# The aux losses each method adds with its test config (an opt-in one, as HydraLoRA's, is off there).
AUX_NAMES = {name: set(make_config(name).aux_loss_weights()) for name in TOKEN_ROUTED}


def one_expert_config(method: str, r: int = 4, alpha: float = 8.0, dropout: float = 0.0, **kw):
    """The degenerate E=1 (k=1) config of a method (MethodSpec.degenerate), to compare with LoRA of rank r."""
    kw.setdefault("n_tasks", N_TASKS)
    return method_cases.spec(method).degenerate(r, alpha, dropout, **kw)


def token_batch(batch: int = 4, seq: int = 8, seed: int = 0, pad: bool = True) -> dict:
    """Random token ids with right padding on two examples."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad:
        mask[0, seq - 3:] = 0
        mask[-1, seq - 1:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def main_output(out) -> torch.Tensor:
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


@torch.no_grad()
def randomise(model, seed: int = 1, scale: float = 0.3) -> None:
    """Give every adapter parameter random values (B is zero at init, which hides most bugs)."""
    g = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if model.parameter_role(name) is not None:
            param.copy_(torch.randn(param.shape, generator=g) * scale)


def adapter_params(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if model.parameter_role(n) is not None}


def standalone_layer(method: str, d_in: int = 12, d_out: int = 10, *, layer_index: int = 0, n_layers: int = 1,
                     seed: int = 0, randomise_b: bool = True, **overrides):
    """One adapted nn.Linear outside any model, with random (non-zero) B."""
    torch.manual_seed(seed)
    cfg = make_config(method, **overrides)
    layer_cls = mtpeft.lib.config.get_layer_class(method)
    layer = layer_cls(nn.Linear(d_in, d_out), cfg, module_name="probe", routing=RoutingState(),
                      layer_index=layer_index, n_layers=n_layers)
    if randomise_b:
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.5)
            if getattr(layer, "interaction", None) is not None:
                layer.interaction.uniform_(-0.3, 0.3)
    return layer


GEMM_OPS = {"mm", "addmm", "bmm", "baddbmm"}


def count_gemms(fn) -> list[tuple[tuple[int, ...], ...]]:
    """Run ``fn`` and return the operand shapes of every matrix product it dispatched."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in GEMM_OPS:
                seen.append(tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))[-2:])
            return func(*args, **(kwargs or {}))

    with Counter():
        fn()
    return seen


def route(mask=None, task_ids=None, record=False) -> Route:
    return Route(row_task_ids=task_ids, token_mask=mask, record=record)


@pytest.fixture
def single_thread():
    """Run a test with one intra-op thread: the tensors here are tiny, and with two threads every op
    pays a thread hand-off (≈1 ms each when the two cores are busy, ~50x the op itself). Used by the
    token-routed test modules through ``pytestmark``; not autouse, so other tests here are unaffected."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(params=list(TOKEN_ROUTED))
def method(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tr() -> SimpleNamespace:
    """The helpers of this file as one namespace."""
    return SimpleNamespace(
        VOCAB=VOCAB, N_TASKS=N_TASKS, TOKEN_ROUTED=TOKEN_ROUTED, AUX_NAMES=AUX_NAMES, BUILDERS=BUILDERS,
        tiny_llama=tiny_llama, tiny_bert=tiny_bert, tiny_gpt2=tiny_gpt2, make_config=make_config,
        one_expert_config=one_expert_config, token_batch=token_batch, cases=method_cases, main_output=main_output,
        randomise=randomise, adapter_params=adapter_params, standalone_layer=standalone_layer, route=route,
        count_gemms=count_gemms,
    )
