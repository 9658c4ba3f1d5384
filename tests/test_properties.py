"""Property tests (hypothesis): every method's fast path equals a plain-loop reference, outputs and every
gradient, over random shapes, E, k, r, task counts and mixes, padding masks, train / eval, fp32 and bf16.

What is compared: the adapted layer's full ``forward`` (base layer + the method's fast path, including
fused adds: the factored methods' addmm_ into the base output), run inside a routing scope exactly as the model
wrapper runs it, against ``base_layer(x) + reference(x)``:

* token-routed methods (MoELoRA, MoSLD, TeamLoRA, HydraLoRA): the library's ``reference_forward``, a
  loop over experts;
* LoRA, per-task LoRA, MTL-LoRA, Poly / MHR, C-Poly: the loops below, written from METHODS.md (one
  example at a time; per split and per skill; Gumbel-sigmoid noise drawn in the fast path's order, so
  training mode is compared too).

Inputs: 2-D (rows, d), 3-D (batch, seq, d) with right padding, and beam-expanded 3-D (batch·k, seq, d)
rows sharing their example's task id. Dropout / DropConnect / Gumbel noise are drawn from the same seed
on both sides. Gradients: of ``sum(output · cotangent)`` w.r.t. x and every adapter parameter.

Tolerances. fp32: outputs atol = rtol = 1e-5; gradients rtol 1e-4 and atol 1e-5 times the case's largest
gradient (a gradient sums up to ~70 rows of terms that large, and some are 0 only by cancellation).

bf16 (adapter and base in bf16, fast bf16 vs loop bf16, so both route the same tokens to the same experts
and draw the same masks): both round every intermediate to 8 significant bits (unit roundoff u = 2^-8) in
different orders (the fast path rounds a stacked GEMM's output once, the loop after every expert / skill /
split it adds), so they differ by roughly (number of roundings in series) · u · (magnitude of the values
summed). That magnitude can be far above the result's: CI once found d_out = 1 where experts' terms of ±56
summed to 1.7 and a base output of -0.97 cancelled half of that, and the two orders differed by 0.28. The
magnitude is measured as the classic running-error bound does: the same computation in fp32 on |weights|
and |x| (and |cotangent| for gradients), whose result bounds the sum of the absolute values of the terms.
The fast path passes when max |fast − loop| <= 8·u · max |that magnitude| (for a gradient, the case's
largest): over 13,500 random cases (1,500 per method, ``MTPEFT_EXPLORE=1500``) the largest ratio seen was
2.8 for outputs and 3.5 for gradients. A wrong fast path differs by the size of the result in cases
without cancellation, which are most; the fp32 property is the exact check.

The cases are derandomized (the same ones on every run, so CI cannot fail on a case no one has seen);
``MTPEFT_EXPLORE=N`` draws N fresh cases per test to look for new counterexamples.

The padding mask does not change outputs; it changes the balance losses, checked against a loop over
the real tokens only (``test_balance_losses_ignore_padding``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import Counter, defaultdict

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import method_cases
import mtpeft
from mtpeft.lib.config import get_config_class, get_layer_class
from mtpeft.lib.core.context import RoutingState

U_BF16 = 2.0 ** -8
BF16_FACTOR = 8
EXAMPLES: Counter = Counter()
RATIOS: dict = defaultdict(list)  # bf16 error / allowed error per kind, to calibrate BF16_FACTOR
MIN_EXAMPLES = 500

# Every registered method (tests/method_cases.py: the package's, then the test-defined ones).
TOKEN_ROUTED = method_cases.methods(routing="token")
TASK_ROUTED = [m for m in method_cases.methods() if m not in TOKEN_ROUTED]  # LoRA and the task-routed ones
METHODS = TASK_ROUTED + TOKEN_ROUTED
PER_METHOD = {torch.float32: 64, torch.bfloat16: 48}  # 9 methods x 112 = 1008 cases


def property_settings(n: int):
    """Derandomized, so CI checks the same cases on every run; ``MTPEFT_EXPLORE=N`` draws N fresh random
    cases per test instead (to look for new counterexamples before a change lands)."""
    explore = int(os.environ.get("MTPEFT_EXPLORE", "0"))
    return settings(max_examples=explore or n, deadline=None, database=None, derandomize=not explore,
                    print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


# ----------------------------------------------------------------------------------- random cases
# Hand-written field strategies: wide ranges of each package method's own fields (a method not named
# here is drawn from its MethodSpec.test_cases by ``_registry_fields``). Each gets (draw, n_tasks,
# unknown, h, dropout) and returns the config fields; the draws run in the order written.
def _lora_fields(draw, n_tasks, unknown, h, dropout, method):
    fields = dict(r=draw(st.integers(1, 8)), lora_alpha=draw(st.sampled_from([1.0, 8.0, 16.0])),
                  lora_dropout=draw(dropout), use_rslora=draw(st.booleans()))
    if method == "task_lora":
        fields["n_tasks"] = n_tasks
    return fields


def _mtl_lora_fields(draw, n_tasks, unknown, h, dropout, method):
    return dict(r=draw(st.integers(1, 6)), n_up=draw(st.integers(1, 4)), n_tasks=n_tasks,
                temperature=draw(st.sampled_from([0.1, 0.5, 1.0, 2.0])), lora_dropout=draw(dropout),
                lambda_type=draw(st.sampled_from(["full", "diagonal"])), lora_alpha=8.0,
                unknown_task="average" if unknown else "error")


def _poly_fields(draw, n_tasks, unknown, h, dropout, method):
    fields = dict(r=draw(st.integers(1, 4)), n_skills=draw(st.integers(1, 4)), n_splits=h, n_tasks=n_tasks,
                  noise_granularity=draw(st.sampled_from(["example", "task"])),
                  unknown_task="average" if unknown else "error")
    if method == "cpoly":
        fields["n_exclusive"] = draw(st.integers(0, 3))
    return fields


def _moelora_fields(draw, n_tasks, unknown, h, dropout, method):
    e = draw(st.integers(1, 8))
    return dict(n_experts=e, top_k=draw(st.integers(1, e)), r=draw(st.integers(1, 4)),
                lora_dropout=draw(dropout), contrastive_sample_size=draw(st.sampled_from([4, 64])))


def _mosld_fields(draw, n_tasks, unknown, h, dropout, method):
    e = draw(st.integers(1, 8))
    return dict(expert_schedule="flat", n_experts=e, top_k=draw(st.integers(1, e)),
                r=draw(st.integers(1, 6)), dropconnect=draw(dropout))


def _teamlora_fields(draw, n_tasks, unknown, h, dropout, method):
    return dict(n_experts=draw(st.integers(1, 6)), r=draw(st.integers(1, 4)), lora_dropout=draw(dropout),
                use_interaction=draw(st.booleans()))


def _hydralora_fields(draw, n_tasks, unknown, h, dropout, method):
    return dict(n_experts=draw(st.integers(1, 6)), r=draw(st.integers(1, 6)), lora_dropout=draw(dropout),
                balance_weight=0.01)


def _registry_fields(draw, n_tasks, unknown, h, dropout, method):
    """One of the method's MethodSpec.test_cases over its test config, with a drawn dropout and policy."""
    spec = method_cases.spec(method)
    overrides = {**draw(st.sampled_from(list(spec.test_cases.values()))), "n_tasks": n_tasks}
    if "n_splits" in _field_names(method):
        overrides["n_splits"] = h
    cfg = spec.small_config(**overrides)
    common = {f.name for f in dataclasses.fields(mtpeft.AdapterConfig)} - {"n_tasks"}
    fields = {k: v for k, v in cfg.to_dict().items() if k not in common | {"method"}}
    if spec.unknown_task_field is not None:
        fields[spec.unknown_task_field] = "average" if unknown else "error"
    if "lora_dropout" in fields:
        fields["lora_dropout"] = draw(dropout)
    return fields


FIELD_STRATEGIES = {"lora": _lora_fields, "task_lora": _lora_fields, "mtl_lora": _mtl_lora_fields,
                    "poly": _poly_fields, "cpoly": _poly_fields, "moelora": _moelora_fields,
                    "mosld": _mosld_fields, "teamlora": _teamlora_fields, "hydralora": _hydralora_fields}


def _field_names(method: str) -> set[str]:
    return {f.name for f in dataclasses.fields(method_cases.spec(method).config_class)}


@st.composite
def cases(draw, method: str) -> dict:
    c = {"method": method, "seed": draw(st.integers(0, 2 ** 31 - 1))}
    c["layout"] = draw(st.sampled_from(["2d", "3d", "3d", "beams"]))
    c["batch"] = draw(st.integers(1, 4))
    c["seq"] = 1 if c["layout"] == "2d" else draw(st.integers(1, 6))
    c["beams"] = draw(st.integers(2, 3)) if c["layout"] == "beams" else 1
    c["masked"] = c["layout"] != "2d" and draw(st.booleans())
    c["train"] = draw(st.booleans())
    dropout = st.sampled_from([0.0, 0.0, 0.1, 0.5])  # 0.5 takes torch's own dropout branch
    if "n_splits" in _field_names(method):  # MHR-style splits: d_in and d_out multiples of h
        h = draw(st.sampled_from([1, 1, 2, 3, 4]))
        c["d_in"], c["d_out"] = h * draw(st.integers(1, 6)), h * draw(st.integers(1, 6))
    else:
        h = 1
        c["d_in"], c["d_out"] = draw(st.integers(1, 24)), draw(st.integers(1, 20))
    n_tasks = draw(st.integers(1, 4))
    unknown = method_cases.spec(method).unknown_task_field is not None and draw(st.booleans())
    fields = FIELD_STRATEGIES.get(method, _registry_fields)(draw, n_tasks, unknown, h, dropout, method)
    if method in TOKEN_ROUTED:
        fields["n_tasks"] = n_tasks  # task ids are passed too: they size the router statistics
    c["fields"] = fields
    high = n_tasks + 2 if unknown else n_tasks
    low = -1 if unknown else 0
    c["task_ids"] = draw(st.lists(st.integers(low, high - 1), min_size=c["batch"], max_size=c["batch"]))
    c["lengths"] = draw(st.lists(st.integers(1, c["seq"]), min_size=c["batch"], max_size=c["batch"]))
    return c


# ----------------------------------------------------------------------------------- building a case
def build_layer(c: dict, dtype: torch.dtype):
    """One adapted nn.Linear (frozen, random) with random adapter weights (B = 0 at init hides bugs)."""
    torch.manual_seed(c["seed"])
    cls = get_config_class(c["method"])
    cfg = cls(**c["fields"], target_modules=["probe"],
              adapter_dtype="bfloat16" if dtype == torch.bfloat16 else "float32")
    base = nn.Linear(c["d_in"], c["d_out"], dtype=dtype).requires_grad_(False)
    layer = get_layer_class(cfg.method)(base, cfg, module_name="probe", routing=RoutingState())
    g = torch.Generator().manual_seed(c["seed"] + 1)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.startswith("base_layer."):
                continue
            if name == "interaction":  # keep the TeamLoRA normaliser 1 + φ·M·1 away from 0
                p.copy_((torch.rand(p.shape, generator=g) - 0.5) * 0.6 / p.shape[0])
            elif name == "lora_lambda":
                eye = torch.eye(p.shape[-1]) if p.dim() == 3 else torch.ones(p.shape[-1])
                p.copy_(eye + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    layer.train(c["train"])
    return layer


def build_inputs(c: dict, dtype: torch.dtype):
    g = torch.Generator().manual_seed(c["seed"] + 2)
    rows = c["batch"] * c["beams"]
    shape = (rows, c["d_in"]) if c["layout"] == "2d" else (rows, c["seq"], c["d_in"])
    x = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    mask = None
    if c["masked"]:
        mask = torch.zeros(c["batch"], c["seq"], dtype=torch.long)
        for i, n in enumerate(c["lengths"]):
            mask[i, :n] = 1  # right padding, at least one real token per example
    ids = torch.tensor(c["task_ids"], dtype=torch.long)
    cot = torch.randn(*shape[:-1], c["d_out"], generator=g).to(dtype)
    return x, mask, ids, cot


def adapter_parameters(layer) -> list[tuple[str, torch.Tensor]]:
    return [(n, p) for n, p in layer.named_parameters() if not n.startswith("base_layer.") and p.requires_grad]


# ----------------------------------------------------------------------------------- loop references
def ref_lora(layer, x, row_ids, c):
    """Δy = s · B A drop(x)."""
    return layer.scaling * ((layer.dropout(x) @ layer.lora_A.T) @ layer.lora_B.T)


def ref_task_lora(layer, x, row_ids, c):
    """Row i uses LoRA t_i: Δy_i = s · B_{t_i} A_{t_i} drop(x_i)."""
    xd = layer.dropout(x)
    return torch.stack([layer.scaling * ((xd[i] @ layer.lora_A[t].T) @ layer.lora_B[t].T)
                        for i, t in enumerate(row_ids.tolist())])


def ref_mtl_lora(layer, x, row_ids, c):
    """Δy_i = s · B̃_t Λ_t A drop(x_i), π_t = softmax(w_t / τ) in fp32, B̃_t = Σ_k π_{t,k} B^k; an unknown
    task uses the mean π and the mean Λ over the tasks."""
    cfg = layer.config
    xd = layer.dropout(x)
    n_tasks = layer.task_logits.shape[0]
    pis = torch.softmax(layer.task_logits.float() / cfg.temperature, dim=-1)  # (T, n)
    lams = layer.lora_lambda if cfg.lambda_type == "full" else torch.diag_embed(layer.lora_lambda)
    out = []
    for i, t in enumerate(row_ids.tolist()):
        known = 0 <= t < n_tasks
        pi = (pis[t] if known else pis.mean(0)).to(layer.lora_B.dtype)
        lam = lams[t] if known else lams.mean(0)
        b_mix = sum(pi[k] * layer.lora_B[k] for k in range(cfg.n_up))  # (d_out, r)
        out.append(cfg.scaling * (((xd[i] @ layer.lora_A.T) @ lam.T) @ b_mix.T))
    return torch.stack(out)


def _skill_weights(logits: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
    """Poly's weights over the last dim: sigmoid (eval) or Gumbel-sigmoid with uniforms u (training),
    normalised to sum 1 (+1e-12)."""
    if u is None:
        v = torch.sigmoid(logits)
    else:
        eps = torch.finfo(torch.float32).eps
        u = u.clamp(min=eps, max=1 - eps)
        v = torch.sigmoid(logits + u.log() - (-u).log1p())
    return v / (v.sum(-1, keepdim=True) + 1e-12)


def ref_poly(layer, x, row_ids, c):
    """Per group (an example in training with per-example noise, else a task): weights per split and skill,
    A_t = Σ_s w_s A_s and B_t = Σ_s w_s B_s block by block (split q owns input block q and output block q),
    plus C-Poly's own skills of the task; Δy = (x A_t) B_t / r. Noise drawn in the fast path's order: the
    common skills' uniforms (G, h, S), then the exclusive skills' (G, h, E) when E > 1."""
    cfg = layer.config
    h, s, r, n_tasks = cfg.n_splits, cfg.n_skills, cfg.r, layer.module_logits.shape[0]
    e = getattr(cfg, "n_exclusive", 0)
    d_in, d_out = layer.in_features // h, layer.out_features // h
    dtype = layer.poly_lora_A.dtype
    slots = [t if 0 <= t < n_tasks else n_tasks for t in row_ids.tolist()]  # n_tasks = "unknown"
    rows_per_example = c["beams"]
    if layer.training and cfg.noise_granularity == "example":
        groups = slots[::rows_per_example]
        group_of_row = [i // rows_per_example for i in range(len(slots))]
    else:
        groups = sorted(set(slots))
        group_of_row = [groups.index(t) for t in slots]
    sample = layer.training
    u_common = torch.rand(len(groups), h, s) if sample else None
    u_own = torch.rand(len(groups), h, e) if sample and e > 1 else None
    factors = []
    for g, t in enumerate(groups):
        if t == n_tasks:
            w = torch.full((h, s), 1.0 / s)
        else:
            w = _skill_weights(layer.module_logits[t].float().view(h, s), None if u_common is None else u_common[g])
        w = w.to(dtype)
        a_blocks, b_blocks = [], []
        for q in range(h):
            a = sum(w[q, k] * layer.poly_lora_A[q, k] for k in range(s))  # (d_in/h, r)
            b = sum(w[q, k] * layer.poly_lora_B[q, k] for k in range(s))  # (r, d_out/h)
            if e and t < n_tasks:
                if e == 1:
                    own = torch.ones(h, 1)
                else:
                    own = _skill_weights(layer.exclusive_logits[t].float().view(h, e),
                                         None if u_own is None else u_own[g])
                own = own.to(dtype)
                a = a + sum(own[q, j] * layer.exclusive_lora_A[t, q, j] for j in range(e))
                b = b + sum(own[q, j] * layer.exclusive_lora_B[t, q, j] for j in range(e))
            a_blocks.append(a)
            b_blocks.append(b)
        assert a_blocks[0].shape == (d_in, r) and b_blocks[0].shape == (r, d_out)
        factors.append((torch.cat(a_blocks, 0), torch.cat(b_blocks, 1)))  # (d_in, r), (r, d_out)
    return torch.stack([((x[i] @ factors[g][0]) / r) @ factors[g][1] for i, g in enumerate(group_of_row)])


def ref_token_routed(layer, x, row_ids, c):
    return layer.reference_forward(x)


REFERENCES = {"lora": ref_lora, "task_lora": ref_task_lora, "mtl_lora": ref_mtl_lora, "poly": ref_poly,
              "cpoly": ref_poly, **{m: ref_token_routed for m in TOKEN_ROUTED}}


# ----------------------------------------------------------------------------------- comparison
def assert_close(fast: torch.Tensor, ref: torch.Tensor, what: str, grad_scale: float | None = None) -> None:
    """fp32, element-wise; for a gradient, atol is 1e-5 of the case's largest gradient (``grad_scale``)."""
    assert fast.shape == ref.shape and fast.dtype == ref.dtype, (what, fast.shape, ref.shape, fast.dtype, ref.dtype)
    if grad_scale is None:
        tol = dict(atol=1e-5, rtol=1e-5)
    else:
        tol = dict(atol=1e-5 * max(1.0, grad_scale), rtol=1e-4)
    torch.testing.assert_close(fast, ref, **tol, msg=lambda m: f"{what}: {m}")


def assert_bf16_close(fast: torch.Tensor, loop: torch.Tensor, what: str, magnitude: float) -> None:
    """max |fast - loop| <= 8·u·magnitude: see the module docstring."""
    assert fast.shape == loop.shape and fast.dtype == loop.dtype == torch.bfloat16, (what, fast.shape, loop.shape)
    if not loop.numel():
        return
    err = float((fast.detach().float() - loop.detach().float()).abs().max())
    RATIOS[what.split(" of ")[0]].append(err / (U_BF16 * max(magnitude, 1e-6)))
    assert err <= BF16_FACTOR * U_BF16 * max(magnitude, 1e-6), (
        f"{what}: max |fast - loop| = {err:.3g} > {BF16_FACTOR}·u·{magnitude:.3g} (the magnitude of the terms "
        f"summed)")


def forward_and_grads(layer, x, ids, mask, cot, c, noise_seed: int, fast: bool):
    """The output and the gradients of sum(output · cotangent) w.r.t. x and every adapter parameter, by
    the fast path (inside a routing scope, as the model wrapper runs it) or by the loop reference."""
    torch.manual_seed(noise_seed)
    if fast:
        with layer.routing.scope(ids, mask, record=True):
            out = layer(x)
    else:
        row_ids = ids.repeat_interleave(c["beams"])
        out = layer.base_layer(x) + REFERENCES[c["method"]](layer, x, row_ids, c).to(x.dtype)
    params = adapter_parameters(layer)
    tensors = [x] + [p for _, p in params]
    grads = torch.autograd.grad((out * cot).float().sum(), tensors, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads)]
    return out, dict(zip(["x"] + [n for n, _ in params], grads))


def magnitude_copy(layer, c: dict):
    """The same layer in fp32 holding the absolute values of the bf16 layer's weights."""
    copy = build_layer(c, torch.float32)
    copy.load_state_dict({k: (v.abs() if v.is_floating_point() else v).float() for k, v in layer.state_dict().items()})
    return copy


def largest(tensors) -> float:
    return max((float(t.detach().abs().max()) for t in tensors if t.numel()), default=0.0)


def run_case(c: dict, dtype: torch.dtype) -> None:
    layer = build_layer(c, dtype)
    x, mask, ids, cot = build_inputs(c, dtype)
    noise_seed = c["seed"] + 3
    fast, fast_grads = forward_and_grads(layer, x, ids, mask, cot, c, noise_seed, fast=True)
    ref, ref_grads = forward_and_grads(layer, x, ids, mask, cot, c, noise_seed, fast=False)
    if dtype == torch.float32:
        assert_close(fast, ref, "output")
        # A gradient sums up to ~70 rows of terms as large as the case's largest gradient, and some are
        # exactly 0 by cancellation (TeamLoRA's interaction matrix with E = 1): fp32 rounding scales with it.
        scale = largest(ref_grads.values())
        for name in ref_grads:
            assert_close(fast_grads[name], ref_grads[name], f"grad of {name}", grad_scale=scale)
    else:
        size, size_grads = forward_and_grads(magnitude_copy(layer, c), x.detach().float().abs().requires_grad_(), ids,
                                             mask, cot.float().abs(), c, noise_seed, fast=False)
        assert_bf16_close(fast, ref, "output", magnitude=largest([size, ref]))
        grad_size = largest(list(size_grads.values()) + list(ref_grads.values()))
        for name in ref_grads:
            assert_bf16_close(fast_grads[name], ref_grads[name], f"grad of {name}", grad_size)
    EXAMPLES[(c["method"], str(dtype))] += 1


# ----------------------------------------------------------------------------------- the properties
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method", METHODS)
def test_fast_path_equals_reference(method, dtype):
    @property_settings(PER_METHOD[dtype])
    @given(cases(method))
    def check(c):
        run_case(c, dtype)

    check()


# ----------------------------------------------------------------------------------- padding and aux losses
def _balance_reference(layer, x2d: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """The balance loss of METHODS.md over the real tokens only (padding rows removed first)."""
    xr = x2d[real]
    cfg = layer.config
    probs = torch.softmax((xr @ layer.router.T).float(), dim=-1)  # (n, E)
    e = probs.shape[-1]
    if cfg.method == "teamlora":
        eye = torch.eye(e)
        psi = probs @ (eye if layer.interaction is None else eye + layer.interaction.float())
        total = psi.sum(-1, keepdim=True)
        eps = cfg.normalizer_eps
        total = torch.where(total >= 0, total.clamp_min(eps), total.clamp_max(-eps))
        w = e * psi / total
        return ((w.mean(0) - 1.0) ** 2).mean()
    k = getattr(layer, "top_k", 1)  # dense routers (HydraLoRA) count each token's largest gate
    chosen = torch.zeros_like(probs)
    chosen.scatter_(-1, probs.topk(k, dim=-1).indices, 1.0)
    f = chosen.mean(0) / k  # share of the routed slots
    return e * (f * probs.mean(0)).sum()


# method -> its balance loss (the declared aux loss named *_balance), for every token-routed method with one
BALANCE = {m: n for m in TOKEN_ROUTED for n in method_cases.spec(m).aux_losses if n.endswith("_balance")}


@pytest.mark.parametrize("method", list(BALANCE))
def test_balance_losses_ignore_padding(method):
    """The recorded balance loss of a padded batch equals the loop formula on its real tokens alone, and
    padding tokens get no gradient from it."""

    @property_settings(30)
    @given(cases(method))
    def check(c):
        c = {**c, "layout": "3d", "beams": 1, "seq": max(c["seq"], 2), "masked": True, "train": False}
        c["lengths"] = [min(n, c["seq"]) for n in c["lengths"]]
        c["fields"] = {**c["fields"], **({"lora_dropout": 0.0} if "lora_dropout" in c["fields"] else {}),
                       **({"dropconnect": 0.0} if "dropconnect" in c["fields"] else {})}
        layer = build_layer(c, torch.float32)
        x, mask, ids, _ = build_inputs(c, torch.float32)
        with layer.routing.scope(ids, mask, record=True):
            layer(x)
        got = layer.routing.summed_aux_losses()[BALANCE[method]]
        real = mask.reshape(-1).bool()
        want = _balance_reference(layer, x.reshape(-1, x.shape[-1]), real)
        torch.testing.assert_close(got.float(), want.float(), atol=1e-5, rtol=1e-5)
        (grad,) = torch.autograd.grad(got, x, allow_unused=True)
        if grad is not None:
            assert torch.all(grad.reshape(-1, x.shape[-1])[~real] == 0)
        EXAMPLES[(method, "balance")] += 1

    check()


def test_at_least_500_random_cases_ran():
    """Runs last in this file: counts the cases the property tests above checked in this session."""
    expected = {(m, str(d)) for m in METHODS for d in PER_METHOD}
    if not expected <= set(EXAMPLES):
        pytest.skip("run the whole file to count the cases")
    total = sum(EXAMPLES.values())
    assert total >= MIN_EXAMPLES, EXAMPLES
    assert sum(PER_METHOD.values()) * len(METHODS) >= MIN_EXAMPLES
