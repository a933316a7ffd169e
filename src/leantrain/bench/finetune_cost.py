"""The cost part of ``leantrain bench finetune``: PaCA against LoRA and full fine-tuning, one fresh process per method.

PaCA (arXiv 2503.01905) claims -22% training time and -16% memory against LoRA when every linear layer is adapted
and sequences are long. The main setting reproduces that regime on SmolLM2-135M (fp32, 1 thread): all seven
projections of every block (q/k/v/o, gate/up/down), batch 1 x 512 tokens, AdamW. LoRA and PaCA get the same
trainable count: LoRA r=27 trains 27 x (in + out) and PaCA r=53 trains 53 x out per layer, and summed over the seven
shapes of a block (576->576 twice, 576->192 twice, 576->1536 twice, 1536->576) both give 274,752, i.e. 8,242,560 over
the 30 blocks (10,176 / 5,184 = 53 / 27, so this is the smallest exact pair of uniform ranks; per layer the counts
differ, PaCA weighing the wide MLP outputs more). Batch 1 keeps the full run short; the paper's MMLU runs use
2 x 512. The second setting is the earlier, cheaper one: q/v only, 4 x 64 tokens, LoRA r=8 vs PaCA r=20.

``python -m leantrain.bench.finetune_cost --setting all-linear --method paca`` measures one method and prints
one JSON line: every timed step's wall time (forward + backward + optimizer step, after warm-up), the process's peak
RSS (VmHWM: model load included, the same for every method; read before any profiling), and the activation
bytes autograd saves for backward over one forward (``torch.autograd.graph.saved_tensors_hooks`` on the first
warm-up step, unique storages, parameters and buffers excluded), in total and inside the adapted layers.
``--profile`` adds one more step under ``torch.profiler`` and reports the top operators by self CPU time and by self
CPU memory. Tokens are uniform random ids (seed 0): the step cost does not depend on their values, and no tokenizer
or data set is needed. A fresh process per method keeps one method's allocations out of another's peak.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from leantrain.process_memory import peak_rss_mb

SMOLLM2_BLOCKS = 30
# (in_features, out_features) of each projection of a SmolLM2-135M block (hidden 576, 3 KV heads of 64, MLP 1536)
SMOLLM2_SHAPES = {
    "q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576),
    "gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576),
}  # fmt: skip
COST_MODEL = "smollm2-135m"  # a registry name, or a folder holding a Hugging Face causal LM (tests use a tiny one)
COST_METHODS = ("lora", "paca", "full")  # the order processes run in, interleaved over repeats


@dataclass(frozen=True)
class CostSetting:
    """One cost comparison: the adapted layers, the batch shape and each method's rank (alpha = 2 x r for both)."""

    name: str
    targets: tuple[str, ...]
    batch: int
    seq_len: int
    lora_r: int
    paca_r: int

    def options(self, method: str) -> dict:
        """Keyword arguments of the method's config for :func:`leantrain.finetune.methods.apply_method`."""
        targets = list(self.targets)
        if method == "lora":
            return {"r": self.lora_r, "lora_alpha": 2 * self.lora_r, "lora_dropout": 0.0, "target_modules": targets}
        if method == "paca":
            return {"r": self.paca_r, "paca_alpha": 2 * self.paca_r, "target_modules": targets, "random_seed": 0}
        return {}

    def smollm2_trainable(self, method: str) -> int:
        """The trainable count on SmolLM2-135M, from the shapes alone (``full``: not defined here)."""
        shapes = [SMOLLM2_SHAPES[t] for t in self.targets]
        if method == "lora":
            per_block = sum(self.lora_r * (i + o) for i, o in shapes)
        elif method == "paca":
            per_block = sum(self.paca_r * o for _, o in shapes)
        else:
            raise ValueError(f"smollm2_trainable: method {method!r} has no closed form")
        return SMOLLM2_BLOCKS * per_block


COST_SETTINGS = {
    s.name: s
    for s in (
        CostSetting("all-linear", tuple(SMOLLM2_SHAPES), batch=1, seq_len=512, lora_r=27, paca_r=53),
        CostSetting("qv", ("q_proj", "v_proj"), batch=4, seq_len=64, lora_r=8, paca_r=20),
    )
}
MAIN_SETTING = "all-linear"  # the targets are evaluated on this one


@dataclass(frozen=True)
class CostPlan:
    """How much to measure: which settings, how many fresh processes per method, steps per process."""

    settings: tuple[str, ...]
    repeats: int
    warmup: int
    steps: int
    seq_len: int | None = None  # overrides every setting's sequence length (the quick run)


FULL_PLAN = CostPlan(settings=tuple(COST_SETTINGS), repeats=3, warmup=2, steps=5)
QUICK_PLAN = CostPlan(settings=(MAIN_SETTING,), repeats=1, warmup=1, steps=2, seq_len=32)


# --------------------------------------------------------------------------------------------------------------------
# The worker: one method, one process


class SavedBytes:
    """Sums the bytes of activations autograd saves, globally and per adapted module (distinct storages).

    Tensors that share storage with a model parameter or buffer (a frozen weight kept for grad_x, PaCA's column
    indices) are not activations and are skipped.
    """

    def __init__(self, model: nn.Module):
        self._params = {t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())}
        self.total = 0
        self.in_layers = 0
        self._seen: set[int] = set()
        self._layer_seen: set[int] | None = None

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr in self._params:
            return t
        size = t.numel() * t.element_size()
        if ptr not in self._seen:
            self._seen.add(ptr)
            self.total += size
        if self._layer_seen is not None and ptr not in self._layer_seen:
            self._layer_seen.add(ptr)
            self.in_layers += size
        return t

    def watch(self, modules: list[nn.Module]) -> None:
        for module in modules:
            module.register_forward_pre_hook(lambda *_: setattr(self, "_layer_seen", set()))
            module.register_forward_hook(lambda *_: setattr(self, "_layer_seen", None))


def adapted_layers(model: nn.Module, targets: tuple[str, ...]) -> list[nn.Module]:
    """The modules wrapping (or, for full fine-tuning, being) the targeted Linear layers."""
    return [m for n, m in model.named_modules() if n.split(".")[-1] in targets]


def load_model(name: str) -> nn.Module:
    """A registry model (``smollm2-135m``) or a Hugging Face causal LM saved in folder ``name``."""
    from leantrain.models import build_model, list_models

    if name in list_models():
        return build_model(name)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)


def top_ops(prof, rows: int) -> dict[str, list[dict]]:
    """The profiled step's operators, most self CPU time first; each with its self CPU memory (allocated - freed)."""
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    table = [
        {"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
         "self_cpu_mem_mb": e.self_cpu_memory_usage / 2**20}
        for e in events
    ]  # fmt: skip
    by_mem = sorted(table, key=lambda r: r["self_cpu_mem_mb"], reverse=True)
    return {"by_time": table[:rows], "by_memory": by_mem[:rows]}


def measure(
    setting: CostSetting,
    method: str,
    steps: int,
    warmup: int,
    threads: int = 1,
    model_name: str = COST_MODEL,
    seq_len: int | None = None,
    profile_rows: int = 0,
) -> dict:
    """Train ``warmup + steps`` steps of ``method``; time the last ``steps``; optionally profile one more."""
    from leantrain.finetune.methods import apply_method
    from leantrain.train.tasks import LanguageModelingTask

    if warmup < 1:
        raise ValueError("warmup must be >= 1: saved activations are counted on the first warm-up step")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = apply_method(load_model(model_name), method, setting.options(method))
    model.train()
    seq_len = seq_len or setting.seq_len
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(model.config.vocab_size, (setting.batch, seq_len + 1), generator=gen)  # (B, T + 1)
    batch = {"x": ids[:, :-1], "labels": ids[:, 1:]}  # (B, T)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    task = LanguageModelingTask()
    saved = SavedBytes(model)
    saved.watch(adapted_layers(model, setting.targets))

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss, _ = task.loss(model, batch)
        loss.backward()
        opt.step()
        return loss.item()

    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        if i == 0:  # count saved activations on a warm-up step, so the hooks never slow a timed one
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
                loss = step()
        else:
            loss = step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    result = {
        "setting": setting.name, "method": method, "model": model_name, "batch": setting.batch, "seq_len": seq_len,
        "threads": threads,
        "step_times_s": times, "peak_rss_mb": peak_rss_mb(),
        "saved_activation_mb": saved.total / 2**20, "saved_in_adapted_layers_mb": saved.in_layers / 2**20,
        "trainable_params": sum(p.numel() for p in params), "final_loss": loss,
    }  # fmt: skip
    if profile_rows:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        result["profile"] = top_ops(prof, profile_rows)
    return result


# --------------------------------------------------------------------------------------------------------------------
# Rows, ratios and targets (used by leantrain.bench.finetune, which runs the workers interleaved)


def cost_row(setting: CostSetting, method: str, runs: list[dict]) -> dict:
    """One benchmark row from a method's processes (medians over every timed step and over the processes)."""
    times = [t for r in runs for t in r["step_times_s"]]
    first = runs[0]
    return {
        "method": method, "anchor": method != "paca", "model": first["model"],
        "task": f"{setting.name} ({first['batch']}x{first['seq_len']} random tokens)",
        "trainable_params": first["trainable_params"], "metric_name": None, "metric": None, "seeds": None,
        "step_time_s_median": statistics.median(times),
        "peak_mem_mb": statistics.median(r["peak_rss_mb"] for r in runs),
        "saved_activation_mb": first["saved_activation_mb"],
        "extra": {"setting": setting.name, "batch": first["batch"], "seq_len": first["seq_len"],
                  "targets": list(setting.targets), "options": setting.options(method),
                  "step_time_s_min": min(times), "step_time_s_max": max(times), "steps_timed": len(times),
                  "processes": len(runs), "threads": first["threads"],
                  "saved_in_adapted_layers_mb": first["saved_in_adapted_layers_mb"],
                  "peak_mem_source": "VmHWM of a fresh process (model load included)",
                  "saved_bytes_source": "saved_tensors_hooks over one training step, unique storages",
                  **({"profile": runs[-1]["profile"]} if "profile" in runs[-1] else {})},
    }  # fmt: skip


def cost_ratios(rows: list[dict]) -> list[dict]:
    """PaCA / LoRA per setting: step time, peak memory, saved activations (total and in the adapted layers)."""
    by = {(r["extra"]["setting"], r["method"]): r for r in rows}
    out = []
    for name in dict.fromkeys(r["extra"]["setting"] for r in rows):
        paca, lora = by.get((name, "paca")), by.get((name, "lora"))
        if paca and lora:
            out.append({
                "setting": name,
                "step_time": paca["step_time_s_median"] / lora["step_time_s_median"],
                "peak_mem": paca["peak_mem_mb"] / lora["peak_mem_mb"],
                "saved_activations": paca["saved_activation_mb"] / lora["saved_activation_mb"],
                "saved_in_layers": paca["extra"]["saved_in_adapted_layers_mb"]
                / lora["extra"]["saved_in_adapted_layers_mb"],
            })  # fmt: skip
    return out


def cost_targets(rows: list[dict]) -> dict[str, bool]:
    """The issue's CPU targets on the main setting (evaluated, never tuned for)."""
    ratios = {r["setting"]: r for r in cost_ratios(rows)}
    main = ratios.get(MAIN_SETTING)
    if main is None:
        return {}
    r_over_d = COST_SETTINGS[MAIN_SETTING].paca_r / 576  # the smallest in_features: the most lenient bound
    return {
        "paca_step_time<=0.85*lora": main["step_time"] <= 0.85,
        "paca_peak_mem<=0.9*lora": main["peak_mem"] <= 0.9,
        "paca_saved_in_layers<=r/d_in*lora": main["saved_in_layers"] <= r_over_d,
    }


def cost_report(rows: list[dict]) -> str:
    """Markdown: the rows per setting, the PaCA/LoRA ratios, and each method's profile when one was taken."""
    from leantrain.bench.report import markdown_table

    parts = []
    cols = ["method", "trainable_params", "step_time_s_median", "step_time_s_min", "step_time_s_max", "peak_mem_mb",
            "saved_activation_mb", "saved_in_layers_mb"]  # fmt: skip
    for name in dict.fromkeys(r["extra"]["setting"] for r in rows):
        table = [{**r, **r["extra"], "saved_in_layers_mb": r["extra"]["saved_in_adapted_layers_mb"]}
                 for r in rows if r["extra"]["setting"] == name]  # fmt: skip
        e = table[0]
        parts.append(f"Cost, {name} (SmolLM2-135M, {e['batch']}x{e['seq_len']} tokens, {e['threads']} thread(s); "
                     "peak_mem_mb = VmHWM of a fresh process)\n" + markdown_table(table, cols))  # fmt: skip
    ratios = cost_ratios(rows)
    if ratios:
        parts.append("PaCA / LoRA\n" + markdown_table(ratios, list(ratios[0])))
    for r in rows:
        if "profile" in r["extra"]:
            prof = r["extra"]["profile"]
            cols = ["op", "calls", "self_cpu_ms", "self_cpu_mem_mb"]
            title = f"Profile, {r['extra']['setting']} {r['method']} (one step)"
            parts.append(f"{title}, by self CPU time\n{markdown_table(prof['by_time'], cols)}")
            parts.append(f"{title}, by self CPU memory\n{markdown_table(prof['by_memory'], cols)}")
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=sorted(COST_SETTINGS), default=MAIN_SETTING)
    parser.add_argument("--method", choices=COST_METHODS, required=True)
    parser.add_argument("--steps", type=int, default=5, help="timed steps after warm-up")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (>= 1)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=None, help="override the setting's sequence length")
    parser.add_argument("--model", default=COST_MODEL, help="registry name or Hugging Face causal-LM folder")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS", help="profile one more step; top ROWS ops")
    args = parser.parse_args(argv)
    result = measure(
        COST_SETTINGS[args.setting], args.method, args.steps, args.warmup, args.threads, args.model, args.seq_len,
        args.profile,
    )  # fmt: skip
    print(json.dumps(result), file=sys.stdout, flush=True)


if __name__ == "__main__":
    main()
