"""``leantrain bench compress``: LoRP / ShortGPT / LLM-Streamline / last-n selection × none / diag / symmetric /
Ghosted recovery on SmolLM2-135M (30 blocks).

Calibration: 64 windows × 256 tokens of the train slice of the default calibration corpus (English Wikipedia
prose; 16,384 tokens, 28× the hidden size 576); evaluation: perplexity on 16 windows × 256 tokens of its disjoint
test slice (in-domain) and of a second, different English source (Lee news, cross-domain) (``--quick``: 16 / 4
windows of 128).
The unpruned model's boundary states are captured once and shared by every selection and fit, as in the
official non-contiguous mode. For every removal count (4, 6, 8) and combination: perplexity, parameters, fit
time; and generation tokens/s of each selection's compressed model against the original (greedy, 32 new tokens,
batch 1, 1 thread, interleaved, median of 3). Targets from the issue are evaluated and printed, never tuned for.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from leantrain.bench.report import BenchResults, Progress, discard, log, markdown_table, print_targets

REMOVALS = (4, 6, 8)
# the issue-18 grid: the three published selectors and auto, without and with Ghosted recovery (the diag and
# symmetric baselines of the earlier Shakespeare tables are one `compress --recover` away)
SELECTORS = ("lorp", "shortgpt", "streamline", "auto")
RECOVERIES = ("none", "ghosted")


def run_bench(quick: bool, out_dir: Path, seeds: int | None = None, parts: tuple[str, ...] = ()) -> Path:
    from leantrain.models import build_model, load_tokenizer
    from leantrain.prune.compress import AUTO_WINDOWS, corpus_splits, corpus_streams, perplexity, token_windows
    from leantrain.prune.compress_args import DEFAULT_CALIB, DEFAULT_EVAL
    from leantrain.prune.depth import boundary_states

    del seeds, parts  # deterministic; one part
    started = time.perf_counter()
    block, calib_n, eval_n = (128, 16, 4) if quick else (256, 64, 16)
    removals = (4,) if quick else REMOVALS
    threads = torch.get_num_threads()
    results = BenchResults("compress", out_dir, threads=threads, quick=quick)
    model = build_model("smollm2-135m").eval()
    tokenizer = load_tokenizer("smollm2-135m")
    calib_ids, validation_ids, eval_ids = corpus_splits(DEFAULT_CALIB, tokenizer)
    calibration = token_windows(calib_ids, block, calib_n)
    validation = token_windows(validation_ids, block, AUTO_WINDOWS)  # select="auto" compares selections on it
    evaluation = {"in": token_windows(eval_ids, block, eval_n),
                  "cross": token_windows(corpus_streams(DEFAULT_EVAL, tokenizer)[1], block, eval_n)}  # fmt: skip
    log(f"SmolLM2-135M: calibration {calib_n}x{block} tokens of {DEFAULT_CALIB}, evaluation {eval_n}x{block} of "
        f"{DEFAULT_CALIB} (held out) and of {DEFAULT_EVAL}, {threads} threads")  # fmt: skip
    base_ppl = {name: perplexity(model, batches) for name, batches in evaluation.items()}
    t0 = time.perf_counter()
    states = boundary_states(model, calibration)
    capture_s = time.perf_counter() - t0
    log(f"  original perplexity {base_ppl['in']:.3f} in-domain, {base_ppl['cross']:.3f} cross-domain; boundary "
        f"states captured in {capture_s:.1f} s")  # fmt: skip
    rows, ghosted = perplexity_rows(model, states, evaluation, removals, add=results.add, validation=validation)
    log("generation speed: 1 thread, greedy 32 new tokens, interleaved with the original")
    torch.set_num_threads(1)
    try:
        prompt = torch.as_tensor(eval_ids[:32].astype("int64"))[None]
        speed_rows = generation_speed(model, ghosted, prompt, removals, repeats=1 if quick else 3)
    finally:
        torch.set_num_threads(threads)
    met = targets(rows, speed_rows, base_ppl)
    extra = {"targets": met, "wall_time_s": round(time.perf_counter() - started, 1), "original_perplexity": base_ppl,
             "capture_s": capture_s, "speed": speed_rows, "calibration_tokens": block * calib_n,
             "evaluation_tokens": block * eval_n, "calibration_text": DEFAULT_CALIB,
             "cross_domain_text": DEFAULT_EVAL}  # fmt: skip
    path = results.finish(extra)
    table = []
    for k in removals:
        for select in SELECTORS:
            r = {
                x["extra"]["recover"]: x
                for x in rows
                if x["extra"]["num_remove"] == k and x["extra"]["select"] == select
            }
            table.append({"removed": k, "select": select, "blocks": r["none"]["extra"]["removed"],
                          "ghosted blocks": r["ghosted"]["extra"]["removed"],
                          **{rec: r[rec]["metric"] for rec in RECOVERIES},
                          **{f"{rec} cross": r[rec]["extra"]["perplexity_cross"] for rec in ("none", "ghosted")},
                          "ghost fit s": r["ghosted"]["extra"]["fit_s"]})  # fmt: skip
    print(f"Perplexity of SmolLM2-135M on held-out {DEFAULT_CALIB} (original {base_ppl['in']:.3f}) and, 'cross', on "
          f"{DEFAULT_EVAL} (original {base_ppl['cross']:.3f})\n"
          + markdown_table(table, ["removed", "select", "blocks", "ghosted blocks", *RECOVERIES, "none cross",
                                   "ghosted cross", "ghost fit s"]))  # fmt: skip
    print("\nGeneration tokens/s (1 thread, greedy, batch 1)\n"
          + markdown_table(speed_rows, ["num_remove", "select", "tokens_per_s", "original_tokens_per_s", "speedup",
                                        "layer_ratio"]))  # fmt: skip
    print_targets(met, path)
    return path


def perplexity_rows(model, states, evaluation, removals: tuple[int, ...], add=discard,
                    validation=None) -> tuple[list[dict], dict]:  # fmt: skip
    """Rows of perplexity per (removal count, selection, recovery), and the Ghosted models for the speed part.

    Every row is passed to ``add`` when measured. The selection is computed once per (removal count, selection),
    inside the unit of its first recovery, except ``auto``, which chooses per recovery on ``validation`` (held-out
    calibration text); ``ghosted`` maps (removal count, selection) to the Ghosted model.
    """
    from leantrain.prune.compress import (
        AUTO_CANDIDATES,
        auto_select,
        candidate_picks,
        perplexity,
        picks_gaps,
        select_layers,
    )
    from leantrain.prune.ghosted import fit_ghosted_layers, gap_moments

    progress = Progress("compress perplexity", len(removals) * len(SELECTORS) * len(RECOVERIES))
    rows, ghosted = [], {}
    for k in removals:
        for select in SELECTORS:
            for recover in RECOVERIES:
                with progress.unit(f"remove {k}, {select}+{recover}"):
                    if select == "auto":
                        t0 = time.perf_counter()
                        picks = candidate_picks(model, states, k, AUTO_CANDIDATES)
                        moments = gap_moments(model, states, picks_gaps(picks)) if recover != "none" else None
                        best, info = auto_select(model, picks, moments, recover, 1e-6, validation, discard)
                        removed = picks[best][0]
                        select_s = time.perf_counter() - t0
                    elif recover == RECOVERIES[0]:
                        t0 = time.perf_counter()
                        removed, info = select_layers(model, states, k, select)
                        select_s = time.perf_counter() - t0
                    pruned, report = fit_ghosted_layers(copy.deepcopy(model), removed, states, method=recover)
                    ppl, cross = perplexity(pruned, evaluation["in"]), perplexity(pruned, evaluation["cross"])
                    log(f"  remove {k} {select:<10} {recover:<9}: blocks {removed}, perplexity {ppl:.3f}, "
                        f"cross-domain {cross:.3f}, fit {report.fit_seconds:.2f} s")  # fmt: skip
                rows.append({
                    "method": f"{select}+{recover}", "anchor": False, "model": "smollm2-135m", "task": "wikipedia",
                    "trainable_params": sum(p.numel() for p in {id(p): p for p in pruned.parameters()}.values()),
                    "metric_name": "perplexity", "metric": ppl, "seeds": 1, "metric_std": None,
                    "extra": {"removed": removed, "num_remove": k, "select": select, "recover": recover,
                              "selection": info, "select_s": select_s, "fit_s": report.fit_seconds,
                              "perplexity_cross": cross,
                              "relative_error": report.relative_error, "gaps": report.gaps,
                              "antisymmetric_fraction": report.antisymmetric_fraction},
                })  # fmt: skip
                add(rows[-1])
                if recover == "ghosted":
                    ghosted[(k, select)] = pruned
    return rows, ghosted


def generation_speed(model, ghosted: dict, prompt, removals: tuple[int, ...], repeats: int) -> list[dict]:
    """Tokens/s of each selection's Ghosted model against the original, per removal count (JSON ``speed``)."""
    from leantrain.prune.compress import tokens_per_second

    progress = Progress("compress speed", len(removals))
    speed_rows = []
    for k in removals:
        with progress.unit(f"remove {k}: original, {', '.join(SELECTORS)}"):
            models = {"original": model, **{s: ghosted[(k, s)] for s in SELECTORS}}
            tps = tokens_per_second(models, prompt, 32, repeats=repeats)
            for s in SELECTORS:
                speed_rows.append({"num_remove": k, "select": s, "layers_kept": 30 - k, "tokens_per_s": tps[s],
                                   "original_tokens_per_s": tps["original"], "speedup": tps[s] / tps["original"],
                                   "layer_ratio": 30 / (30 - k)})  # fmt: skip
            log(f"  remove {k}: " + ", ".join(f"{n} {v:.1f} tok/s" for n, v in tps.items()))
    return speed_rows


def targets(rows: list[dict], speed_rows: list[dict], base_ppl: dict[str, float] | None = None) -> dict[str, bool]:
    ppl = {(r["extra"]["num_remove"], r["extra"]["select"], r["extra"]["recover"]): r["metric"] for r in rows}
    cross = {(r["extra"]["num_remove"], r["extra"]["select"], r["extra"]["recover"]): r["extra"]["perplexity_cross"]
             for r in rows}  # fmt: skip
    out: dict[str, bool] = {}
    for (
        select
    ) in SELECTORS:  # the target: the default command at 6 removed blocks (for each candidate default)
        if base_ppl and (6, select, "ghosted") in cross:
            ratio = cross[(6, select, "ghosted")] / base_ppl["cross"]
            out[f"remove6_{select}+ghosted_cross_domain<=1.7x_original"] = ratio <= 1.7
    for k in sorted({key[0] for key in ppl}):
        out[f"remove{k}_lorp<=shortgpt (no recovery)"] = ppl[(k, "lorp", "none")] <= ppl[(k, "shortgpt", "none")]
        for s in SELECTORS:
            out[f"remove{k}_{s}_ghosted<none"] = ppl[(k, s, "ghosted")] < ppl[(k, s, "none")]
    if speed_rows:
        # tokens/s should grow with the layers removed: at least half of the ideal 30/(30-k) gain
        out["tokens_per_s_scale_with_layers_kept"] = all(
            r["speedup"] - 1 >= 0.5 * (r["layer_ratio"] - 1) for r in speed_rows
        )
    return out
