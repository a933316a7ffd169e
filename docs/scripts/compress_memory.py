"""Peak RSS of the compression API alone on SmolLM2-135M (docs/compress.md, Memory): after loading, and after
compress_model (Ghosted recovery, N x 256 Wikipedia calibration tokens, streamed), no copy of the model kept.

Run from the repository root: .venv/bin/python docs/scripts/compress_memory.py [selector] [windows]
"""

import resource
import sys

import torch

from leantrain.models import build_model, load_tokenizer
from leantrain.prune.compress import compress_model, corpus_streams, token_windows

torch.set_num_threads(2)


def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


model = build_model("smollm2-135m").eval()
tok = load_tokenizer("smollm2-135m")
fp32 = sum(p.numel() for p in model.parameters()) * 4 / 1e9
calib = token_windows(corpus_streams("wikipedia", tok)[0], 256, int(sys.argv[2]) if len(sys.argv) > 2 else 64)
print(f"fp32 model {fp32:.3f} GB; peak RSS after load {peak():.3f} GB", flush=True)
r = compress_model(model, calib, 6, select=sys.argv[1] if len(sys.argv) > 1 else "shortgpt")
print(f"removed {r.removed}; peak RSS after compress_model {peak():.3f} GB")
