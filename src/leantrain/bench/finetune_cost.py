"""One fine-tuning method's training-step cost on SmolLM2-135M, measured in a fresh process.

``python -m leantrain.bench.finetune_cost --method paca --steps 5`` loads SmolLM2-135M (fp32), applies the
method, trains on batch 4 x 64 Shakespeare tokens with AdamW, and prints one JSON line: every timed step's
wall time, the process's peak RSS (``ru_maxrss``: model load included, the same for every method), and the
activation bytes autograd saves for backward in one step, in total and inside the adapted Linear layers
(``torch.autograd.graph.saved_tensors_hooks``; storages counted once per layer; parameters excluded). A fresh
process per method keeps one method's allocations out of another's peak.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch
from torch import nn

from leantrain.bench.finetune import COST_METHODS, SMOLLM_TARGETS


class SavedBytes:
    """Sums the bytes of activations autograd saves, globally and per adapted module (distinct storages).

    Tensors that are views of model parameters (a frozen weight kept for grad_x) are not activations and
    are skipped.
    """

    def __init__(self, model: nn.Module):
        self._params = {p.untyped_storage().data_ptr() for p in model.parameters()}
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


def adapted_layers(model: nn.Module, method: str) -> list[nn.Module]:
    """The modules wrapping (or, for full fine-tuning, being) the targeted Linear layers."""
    names = tuple(SMOLLM_TARGETS)
    return [m for n, m in model.named_modules() if n.split(".")[-1] in names]


def measure(method: str, steps: int, warmup: int, threads: int) -> dict:
    from leantrain.data import lm_blocks, load_dataset
    from leantrain.finetune.methods import apply_method
    from leantrain.models import build_model, load_tokenizer
    from leantrain.train.tasks import LanguageModelingTask

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tokens = load_dataset("shakespeare", tokenizer=load_tokenizer("smollm2-135m")).train.x
    x, y = lm_blocks(tokens[: 4 * 65 + 1], 64)
    batch = {"x": torch.from_numpy(x[:4]), "labels": torch.from_numpy(y[:4])}  # (4, 64)
    model = apply_method(build_model("smollm2-135m"), method, dict(COST_METHODS[method]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    task = LanguageModelingTask()
    saved = SavedBytes(model)
    saved.watch(adapted_layers(model, method))
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if i == 0:  # count saved activations on a warm-up step, so the hooks never slow a timed one
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
                loss, _ = task.loss(model, batch)
        else:
            loss, _ = task.loss(model, batch)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {
        "method": method,
        "step_times_s": times,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "saved_activation_mb": saved.total / 2**20,
        "saved_in_adapted_layers_mb": saved.in_layers / 2**20,
        "trainable_params": sum(p.numel() for p in params),
        "final_loss": loss.item(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=sorted(COST_METHODS), required=True)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.method, args.steps, args.warmup, args.threads)), file=sys.stdout, flush=True)


if __name__ == "__main__":
    main()
