"""One adapted layer at SmolLM2's attention shapes (576 -> 576 and 576 -> 192, 4 x 128 tokens): forward +
backward of our LoRA r=8 and MTL-LoRA (mixed and single-task batches), each without and with dropout
0.05, minus the frozen base layer. Separates what a task-routed method's train step costs beyond LoRA
(the per-task matrices) from what its dropout costs (LoRA's default is no dropout).

    python benchmarks/task_layer_dropout.py [threads]     # ~1 min; interleaved, medians of 15 rounds
"""

import sys

import torch
from torch import nn

import mtpeft as mt
from mtpeft.bench.timing import interleaved, set_threads
from mtpeft.config import get_layer_class
from mtpeft.core.context import RoutingState


def standalone(cfg, d_in: int, d_out: int):
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=False).requires_grad_(False)
    layer = get_layer_class(cfg.method)(base, cfg, module_name="layers.0.proj", routing=RoutingState(),
                                        layer_index=0, n_layers=1)
    with torch.no_grad():  # non-zero B (B = 0 at init)
        for name, p in layer.named_parameters():
            if not name.startswith("base_layer") and "B" in name:
                p.normal_(0, 0.02)
    return layer.train()


def main() -> None:
    set_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    cases = {}
    for d_out in (576, 192):
        x = torch.randn(4, 128, 576, requires_grad=True)
        g = torch.randn(4, 128, d_out)

        def fb(fn, x=x, g=g):
            def run():
                fn().backward(g)
                x.grad = None
            return run

        base = standalone(mt.LoraConfig(r=1), 576, d_out).base_layer
        cases[f"{d_out}/base"] = fb(lambda base=base, x=x: base(x))
        for p in (0.0, 0.05):
            lora = standalone(mt.LoraConfig(r=8, lora_alpha=16, lora_dropout=p), 576, d_out)
            cases[f"{d_out}/lora p={p}"] = fb(lambda lora=lora, x=x: lora(x))
            mtl = standalone(mt.MTLLoraConfig(n_tasks=4, lora_dropout=p), 576, d_out)
            for mode, ids in (("mixed", torch.arange(4) % 4), ("single", torch.zeros(4, dtype=torch.long))):
                def routed(mtl=mtl, ids=ids, x=x):
                    with mtl.routing.scope(ids, None, record=False):
                        return mtl(x)
                cases[f"{d_out}/mtl_lora p={p} {mode}"] = fb(routed)
    t = interleaved(cases, repeats=15, warmup=3, min_seconds=0.05, extra_rounds=0)
    print(f"{'case':30s} {'ms':>8s} {'minus base ms':>14s}")
    for name in cases:
        base = name.split("/")[0] + "/base"
        print(f"{name:30s} {t.median(name) * 1e3:8.3f} {(t.median(name) - t.median(base)) * 1e3:14.3f}")


if __name__ == "__main__":
    main()
