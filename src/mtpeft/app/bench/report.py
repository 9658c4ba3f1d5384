"""The issue's targets, each ratio's verdict, and the tables (terminal and markdown)."""

from __future__ import annotations

# The targets: (name, comparison, bound). "<=": ratio must not exceed it; ">=": at least it.
TARGETS = {
    "lora_vs_floor": ("<=", 1.05),
    "lora_vs_peft_lora": ("<=", 0.98),
    "token_routed_vs_equal_rank_lora": ("<=", 1.10),
    "token_routed_vs_floor": ("<=", 1.15),
    "task_routed_mixed_vs_lora": ("<=", 1.05),
    "poly_mhr_vs_peft": ("<=", 0.98),
    "reference_loop_vs_fast_path_E8": (">=", 2.0),
    "merged_vs_base_inference": ("<=", 1.02),
    "peak_train_memory_vs_lora": ("<=", 1.10),
}


def verdict(op: str, bound: float, ci: list[float] | None) -> str | None:
    """"met" / "missed" when the whole confidence interval is on one side of the bound, "noise" when it
    straddles it (this run cannot tell), None without an interval."""
    if not ci:
        return None
    lo, hi = ci
    good, bad = (hi <= bound, lo > bound) if op == "<=" else (lo >= bound, hi < bound)
    return "met" if good else "missed" if bad else "noise"


def measured(row: dict, key: str) -> tuple[float | None, list[float] | None]:
    """A row's ratio and its confidence interval (None where the row has no interval, e.g. memory)."""
    return row.get(key), row.get(key + "_ci")


def evaluate_targets(res: dict) -> list[dict]:
    out = []

    def add(target, subject, value, ci=None):
        op, bound = TARGETS[target]
        if value is None:
            return
        met = value <= bound if op == "<=" else value >= bound
        out.append({"target": target, "subject": subject, "value": value, "ci": ci, "bound": f"{op} {bound}",
                    "met": met, "verdict": verdict(op, bound, ci)})

    for model, data in res.get("train", {}).items():
        rows = {r["name"]: r for r in data["rows"]}
        if "lora_r8" in rows:
            add("lora_vs_floor", f"{model}: lora_r8", *measured(rows["lora_r8"], "vs_floor"))
            add("lora_vs_peft_lora", f"{model}: lora_r8", *measured(rows["lora_r8"], "vs_peft"))
        for r in data["rows"]:
            if r["routing"] == "token" and not r["name"].endswith("_loop"):
                add("token_routed_vs_equal_rank_lora", f"{model}: {r['name']} vs {r.get('lora_ref')}",
                    *measured(r, "vs_equal_rank_lora"))
                add("token_routed_vs_floor", f"{model}: {r['name']}", *measured(r, "vs_floor"))
            if r["routing"] == "task" and r["task_batch"] == "mixed":
                add("task_routed_mixed_vs_lora", f"{model}: {r['name']} vs {r.get('lora_ref')}",
                    *measured(r, "vs_equal_rank_lora"))
            if r["routing"] == "task" and r.get("peft_ref"):  # a task-routed method with a PEFT counterpart
                add("poly_mhr_vs_peft", f"{model}: {r['name']} vs {r.get('peft_ref')}", *measured(r, "vs_peft"))
    layer = res.get("layer", {}).get("rows", [])
    for method in sorted({r["method"] for r in layer if r["routing"] == "token"}):
        sel = [r for r in layer if r["method"] == method and r["E"] == 8]
        if sel:
            add("reference_loop_vs_fast_path_E8", f"layer: {method}, worst over d, r (whole layer)",
                min(r["ref_vs_fast"] for r in sel))
            add("reference_loop_vs_fast_path_E8", f"layer: {method}, worst over d, r (adapter only)",
                min(r["adapter_ref_vs_fast"] for r in sel))
    for model, data in res.get("infer", {}).items():
        for r in data["rows"]:
            if r["name"] in ("lora_merged", "task_lora_merged"):
                add("merged_vs_base_inference", f"{model} {r['mode']}: {r['name']}", *measured(r, "vs_base"))
    for model, data in res.get("memory", {}).items():
        for r in data["rows"]:
            if "step_peak_vs_lora" in r and "@answers" not in r["name"]:  # that pair: logits, not adapters
                add("peak_train_memory_vs_lora", f"{model}: {r['name']} vs {r['lora_ref']} (step peak)",
                    *measured(r, "step_peak_vs_lora"))
    return out


def _fmt(v) -> str:
    return "" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def tables(res: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """Every result table as (title, column names, formatted rows): one source for the terminal and
    the markdown renderings."""
    out = []

    def add(title, cols, rows):
        out.append((title, [c.replace("_", " ") for c in cols], [[_fmt(r.get(c)) for c in cols] for r in rows]))

    for model, data in res.get("train", {}).items():
        add(f"train step, {model} {data['batch'][0]}x{data['batch'][1]} (ratios: median of per-round ratios)",
            ["name", "median_s", "vs_floor", "flop_predicted_vs_floor", "lora_ref", "vs_equal_rank_lora",
             "flop_predicted_vs_equal_rank_lora", "vs_peft", "mixed_vs_single", "trainable_params"], data["rows"])
    if res.get("layer", {}).get("rows"):
        add("layer level: forward + backward, whole adapted layer (and adapter only)",
            ["method", "d", "E", "r", "lora_rank", "fast_ms", "ref_ms", "lora_ms", "base_ms", "ref_vs_fast",
             "fast_vs_lora", "adapter_ref_vs_fast", "adapter_fast_vs_lora"], res["layer"]["rows"])
    for model, data in res.get("infer", {}).items():
        add(f"inference, {model} {data['batch'][0]}x{data['batch'][1]}",
            ["name", "mode", "median_s", "vs_base", "vs_peft_mixed"], data["rows"])
    for model, data in res.get("memory", {}).items():
        add(f"peak training memory, {model} {data['batch'][0]}x{data['batch'][1]}",
            ["name", "step_peak_mb", "peak_rss_mb", "lora_ref", "step_peak_vs_lora", "peak_rss_vs_lora"],
            data["rows"])
    if res.get("targets"):
        def ci(t):
            return f"{t['ci'][0]:.3f}-{t['ci'][1]:.3f}" if t.get("ci") else ""

        out.append(("targets (met: the median; verdict: where the 95 % interval of the median lies)",
                    ["target", "subject", "value", "95% CI", "bound", "met", "verdict"],
                    [[t["target"], t["subject"], _fmt(t["value"]), ci(t), t["bound"], "yes" if t["met"] else "NO",
                      t.get("verdict") or ""] for t in res["targets"]]))
    return out


def print_tables(res: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=200)
    for title, cols, rows in tables(res):
        tab = Table(title=title)
        for c in cols:
            tab.add_column(c)
        for row in rows:
            tab.add_row(*row)
        console.print(tab)


def markdown_tables(res: dict) -> str:
    parts = []
    for title, cols, rows in tables(res):
        lines = [f"**{title}**", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


