"""One adapted layer at SmolLM2's attention shapes (576 -> 576 and 576 -> 192, 4 x 128 tokens), forward +
backward minus the frozen base layer, with its parts switched off one at a time: where a method's train
step goes beyond LoRA's on small batches.

* ``mtl``: LoRA r=8 and MTL-LoRA (mixed and single-task batches), each without and with dropout 0.05
  (LoRA's default is no dropout; MTL-LoRA's is 0.05).
* ``moelora``: LoRA r=32 (its equal total rank) without and with dropout, and MoELoRA at its defaults,
  without its aux losses, without dropout, and without both.

    python benchmarks/layer_parts.py mtl|moelora [threads]    # ~1-2 min; interleaved, medians of 15 rounds
"""

import sys

import torch

import mtpeft as mt
from mtpeft.app.bench.layer import standalone
from mtpeft.app.bench.timing import interleaved, set_threads


def mtl_cases(fb, d_out: int) -> dict:
    cases = {}
    for p in (0.0, 0.05):
        lora = standalone(mt.LoraConfig(r=8, lora_alpha=16, lora_dropout=p), 576, d_out=d_out)
        cases[f"{d_out}/lora p={p}"] = fb(lambda lora=lora: lora)
        mtl = standalone(mt.MTLLoraConfig(n_tasks=4, lora_dropout=p), 576, d_out=d_out)
        for mode, ids in (("mixed", torch.arange(4) % 4), ("single", torch.zeros(4, dtype=torch.long))):
            cases[f"{d_out}/mtl_lora p={p} {mode}"] = fb(lambda mtl=mtl: mtl, ids)
    return cases


def moelora_cases(fb, d_out: int) -> dict:
    cases = {}
    for p in (0.0, 0.05):
        lora = standalone(mt.LoraConfig(r=32, lora_alpha=64, lora_dropout=p), 576, d_out=d_out)
        cases[f"{d_out}/lora_r32 p={p}"] = fb(lambda lora=lora: lora)
    for label, kw in (("defaults", {}), ("no aux", dict(balance_weight=0.0, contrastive_weight=0.0)),
                      ("no dropout", dict(lora_dropout=0.0)),
                      ("no aux, no dropout", dict(balance_weight=0.0, contrastive_weight=0.0, lora_dropout=0.0))):
        layer = standalone(mt.MoELoraConfig(n_tasks=4, **kw), 576, d_out=d_out)
        cases[f"{d_out}/moelora {label}"] = fb(lambda layer=layer: layer, torch.arange(4) % 4)
    return cases


def main() -> None:
    which = sys.argv[1] if len(sys.argv) > 1 else "mtl"
    set_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    cases = {}
    for d_out in (576, 192):
        x = torch.randn(4, 128, 576, requires_grad=True)
        g = torch.randn(4, 128, d_out)

        def fb(get_layer, ids=None, x=x, g=g):
            layer = get_layer()

            def run():
                if ids is None:
                    y = layer(x)
                    y.backward(g)
                else:  # task ids in scope, aux losses recorded and back-propagated as in training
                    routing = layer.routing
                    with routing.scope(ids, None, record=True):
                        y = layer(x)
                    aux = routing.weighted_aux_total(routing.summed_aux_losses())
                    torch.autograd.backward([y] + ([aux] if aux is not None else []),
                                            [g] + ([torch.ones(())] if aux is not None else []))
                x.grad = None
            return run

        base = standalone(mt.LoraConfig(r=1), 576, d_out=d_out).base_layer
        cases[f"{d_out}/base"] = fb(lambda: base)
        cases.update((mtl_cases if which == "mtl" else moelora_cases)(fb, d_out))
    t = interleaved(cases, repeats=15, warmup=3, min_seconds=0.05, extra_rounds=0)
    print(f"{'case':34s} {'ms':>8s} {'minus base ms':>14s}")
    for name in cases:
        base = name.split("/")[0] + "/base"
        print(f"{name:34s} {t.median(name) * 1e3:8.3f} {(t.median(name) - t.median(base)) * 1e3:14.3f}")


if __name__ == "__main__":
    main()
