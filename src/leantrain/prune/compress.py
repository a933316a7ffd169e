"""Depth compression of a decoder LLM end to end: calibrate, select blocks, remove them, recover, measure.

This is what ``leantrain compress`` and ``leantrain bench compress`` run. Calibration and evaluation use disjoint
token streams (the train and test slices of a corpus); perplexity is the exponential of the mean next-token loss
over fixed windows; generation speed is greedy decoding with the KV cache, batch 1.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from leantrain.errors import ConfigError
from leantrain.prune.compress_args import (
    DEFAULT_CALIB,
    SELECTORS,
    TextSource,
    check_compress_args,
    default_eval_source,
)
from leantrain.prune.depth import BoundarySimilarity, BoundaryStates, check_budget, decoder_layers, similarity_of
from leantrain.prune.ghosted import METHODS, GhostReport, contiguous_gaps, fit_ghosted_layers, gap_moments
from leantrain.prune.lorp import (
    PROTECT,
    SHORTGPT_PROTECT,
    select_layers_last_n,
    select_layers_lorp,
    select_layers_shortgpt,
    select_layers_streamline,
)

Batch = dict[str, torch.Tensor]


def token_windows(ids: np.ndarray, block: int, count: int, batch_size: int = 4, where: str = "") -> list[Batch]:
    """``count`` consecutive non-overlapping windows of ``block`` tokens from ``ids``, in batches."""
    needed = block * count
    if len(ids) < needed:
        raise ConfigError(
            f"{where or 'the token stream'} has {len(ids):,} tokens; {count} windows of {block} need {needed:,}; "
            "use fewer or shorter windows"
        )
    windows = torch.as_tensor(np.asarray(ids[:needed], dtype=np.int64)).reshape(count, block)
    return [{"input_ids": windows[i : i + batch_size]} for i in range(0, count, batch_size)]


@torch.no_grad()
def perplexity(model: nn.Module, batches: Sequence[Batch]) -> float:
    """exp(mean next-token cross-entropy) over every predicted token of ``batches``."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        ids = batch["input_ids"]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]  # (B, T-1, V)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                                           reduction="sum")  # fmt: skip
        total, count = total + loss.item(), count + ids[:, 1:].numel()
    return math.exp(min(total / count, 50.0))


@torch.no_grad()
def generation_seconds(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    """Wall seconds of greedy generation of ``new_tokens`` after ``prompt`` (1, T), with the KV cache."""
    model.eval()
    start = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         use_cache=True, pad_token_id=0)  # fmt: skip
    elapsed = time.perf_counter() - start
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return elapsed


def tokens_per_second(models: dict[str, nn.Module], prompt: torch.Tensor, new_tokens: int, repeats: int) -> dict:
    """Median tokens/s of each model, interleaved (a, b, a, b, ...) after one warm-up each."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():
        generation_seconds(model, prompt, min(new_tokens, 4))
    for _ in range(repeats):
        for name, model in models.items():
            times[name].append(generation_seconds(model, prompt, new_tokens))
    return {name: new_tokens / statistics.median(t) for name, t in times.items()}


@dataclass
class Compression:
    """The outcome of :func:`compress_model`."""

    model: nn.Module
    removed: list[int]
    select: str
    recover: str
    layers_before: int
    layers_after: int
    selection: dict = field(default_factory=dict)  # rls, num_clusters, labels (lorp)
    ghosts: GhostReport | None = None
    select_seconds: float = 0.0


def check_family(model: nn.Module, recover: str) -> None:
    """Refuse, before anything is modified, a model whose recovered form could not be saved and reloaded.

    Recovery operators ride on ghosted subclasses of the supported families (Llama, Mistral, Qwen2, Qwen3); other
    decoder families (OLMo, Gemma, ...) would be pruned and then fail at conversion. ``recover="none"`` only deletes
    blocks and renumbers them, which works for any Hugging Face decoder with ``model.model.layers``.
    """
    from leantrain.prune.configuration_ghosted import FAMILIES, PREFIX

    family = str(getattr(getattr(model, "config", None), "model_type", "")).removeprefix(PREFIX)
    if recover != "none" and family not in FAMILIES:
        raise ConfigError(
            f"recovery {recover!r} supports {', '.join(FAMILIES)} models, not model_type {family or '?'!r}; use "
            "recover='none' (block removal only) for this model"
        )


def check_choices(select: str, recover: str, prefix: str = "") -> None:
    """A ConfigError naming the valid choices for an unknown selection or recovery (``prefix``: "--" for the CLI)."""
    if select not in SELECTORS:
        raise ConfigError(f"{prefix}select {select!r} is invalid; use one of {', '.join(SELECTORS)}")
    if recover not in METHODS:
        raise ConfigError(f"{prefix}recover {recover!r} is invalid; use one of {', '.join(METHODS)}")


def _lorp(model, states, num_remove, protect, num_clusters):
    sel = select_layers_lorp(model, states, num_remove, num_clusters=num_clusters, protect=protect)
    return sel.indices, {"rls": sel.rls, "num_clusters": sel.num_clusters, "labels": sel.labels}


def _streamline(model, states, num_remove, protect, _num_clusters):
    blocks, cos = select_layers_streamline(model, states, num_remove, protect=protect)
    return blocks, {"cosine": cos}


# selector -> (its function (model, states, num_remove, protect, num_clusters) -> (blocks, info), default protection)
SELECTIONS = {
    "lorp": (_lorp, PROTECT),
    "shortgpt": (lambda m, st, k, p, _c: (select_layers_shortgpt(m, st, k, protect=p), {}), SHORTGPT_PROTECT),
    "streamline": (_streamline, PROTECT),
    "last_n": (lambda m, _st, k, p, _c: (select_layers_last_n(m, k, protect=p), {}), PROTECT),
}


AUTO_WINDOWS = 8  # validation windows (of ``block`` tokens) on which ``select="auto"`` compares the selections
# the selections ``select="auto"`` compares (with the chosen recovery, on held-out calibration text)
AUTO_CANDIDATES = ("lorp", "shortgpt", "streamline")


def select_layers(
    model: nn.Module, states: BoundaryStates | BoundarySimilarity, num_remove: int, select: str,
    protect: Sequence[int] | None = None, num_clusters: int | None = None,
) -> tuple[list[int], dict]:  # fmt: skip
    """The blocks ``select`` removes, and what it learned (LoRP's RLS, K and clusters; Streamline's cosine).

    ``protect=None``: the selector's own default (the first and last blocks; ShortGPT's official candidates)."""
    if select not in SELECTIONS:
        raise ConfigError(f"select={select!r} is invalid; use one of {', '.join(SELECTIONS)}")
    function, default = SELECTIONS[select]
    return function(model, states, num_remove, default if protect is None else protect, num_clusters)


def compress_model(
    model: nn.Module,
    calibration: Sequence[Batch] | BoundaryStates,
    num_remove: int,
    select: str = "lorp",
    recover: str = "ghosted",
    protect: Sequence[int] | None = None,
    num_clusters: int | None = None,
    ridge: float = 1e-6,
    on_stage: Callable[[str], None] | None = None,
    validation: Sequence[Batch] | None = None,
) -> Compression:
    """Select ``num_remove`` blocks of ``model`` on ``calibration``, remove them and recover with ``recover``.

    ``select="auto"`` compresses with every selector of :data:`AUTO_CANDIDATES` (each with ``recover``) and keeps
    the one with the lowest perplexity on ``validation`` (batches of held-out text from the calibration source,
    never the evaluation text); ``info["auto"]`` holds each candidate's blocks and validation perplexity.
    """
    check_choices(select, recover)
    check_family(model, recover)
    if select == "auto" and not validation:
        raise ConfigError("select='auto' needs validation batches (held-out calibration text) to compare selections")
    n = len(decoder_layers(model))
    stage = on_stage or (lambda _text: None)
    started = time.perf_counter()
    if not isinstance(calibration, BoundaryStates):
        stage("calibration pass 1 of 2: similarity between all block boundaries, streamed batch by batch")
    similarity = similarity_of(model, calibration)
    candidates = AUTO_CANDIDATES if select == "auto" else (select,)
    picks = candidate_picks(model, similarity, num_remove, candidates, protect, num_clusters)
    moments = None
    if recover != "none":
        if not isinstance(calibration, BoundaryStates):
            stage("calibration pass 2 of 2: moments of the states around each gap, streamed")
        moments = gap_moments(model, calibration, picks_gaps(picks))
    info: dict = {}
    if select == "auto":
        select, info = auto_select(model, picks, moments, recover, ridge, validation, stage)
    removed, found, protect = picks[select]
    info = {**found, **info}
    seconds = time.perf_counter() - started
    stage(f"removing blocks {removed} ({select}), recovery: {recover}")
    compressed, report = fit_ghosted_layers(model, removed, moments, ridge=ridge, method=recover, protect=protect)
    return Compression(compressed, removed, select, recover, n, n - len(removed), info, report, seconds)


def candidate_picks(model, similarity, num_remove, candidates, protect=None, num_clusters=None) -> dict:
    """{selector: (blocks, what it learned, its protection)} for each of ``candidates`` on one similarity."""
    n = len(decoder_layers(model))
    picks = {}
    for candidate in candidates:
        guard = SELECTIONS[candidate][1] if protect is None else protect
        check_budget(num_remove, n, guard)
        picks[candidate] = (*select_layers(model, similarity, num_remove, candidate, guard, num_clusters), guard)
    return picks


def picks_gaps(picks: dict) -> set[tuple[int, int]]:
    """Every gap (first, last) that some pick's removal leaves: the moments one calibration pass must gather."""
    return {gap for removed, _info, _guard in picks.values() for gap in contiguous_gaps(removed)}


def auto_select(model, picks, moments, recover, ridge, validation, stage):
    """(the candidate whose compressed model has the lowest validation perplexity, {"auto": per-candidate results}).

    ``picks``: {candidate: (blocks, info, protection)}; ``moments``: the gaps' :class:`GapMoments` (None without
    recovery). Each candidate is compressed on a copy of ``model``, evaluated, and dropped before the next."""
    import copy

    scores = {}
    for candidate, (removed, _info, guard) in picks.items():
        trial, _ = fit_ghosted_layers(copy.deepcopy(model), removed, moments, ridge=ridge, method=recover,
                                      protect=guard)  # fmt: skip
        scores[candidate] = {"removed": removed, "validation_perplexity": perplexity(trial, validation)}
        ppl = scores[candidate]["validation_perplexity"]
        stage(f"auto: {candidate} removes {removed}, validation perplexity {ppl:.3f}")
        del trial
    best = min(scores, key=lambda c: (scores[c]["validation_perplexity"], AUTO_CANDIDATES.index(c)))
    return best, {"auto": {"chosen": best, "candidates": scores}}


def parameter_count(model: nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def corpus_streams(corpus: str, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(calibration, evaluation) token streams: the train and the test slice of ``corpus``, disjoint."""
    fit, _validation, test = corpus_splits(corpus, tokenizer)
    return fit, test


def corpus_splits(corpus: str, tokenizer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The train, val and test token streams of ``corpus`` (contiguous, disjoint)."""
    from leantrain.data import load_dataset

    ds = load_dataset(corpus, tokenizer=tokenizer)
    if ds.kind != "lm":
        raise ConfigError(f"corpus {corpus!r} is not a language-modelling dataset; use e.g. wikipedia")
    return np.asarray(ds.train.x), np.asarray(ds.val.x), np.asarray(ds.test.x)


def source_streams(source: TextSource, tokenizer, held_out_tokens: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fit, validation, held-out) token streams of ``source``, disjoint: a dataset's train, val and test slices,
    or a file's tokens with its last ``held_out_tokens`` held out and as many before them for validation."""
    if source.dataset is not None:
        return corpus_splits(source.dataset, tokenizer)
    from leantrain.data.lm_corpus import read_text_file, tokenize_corpus

    ids = tokenize_corpus(tokenizer, read_text_file(source.file, source.field))
    if len(ids) <= 2 * held_out_tokens:
        raise ConfigError(
            f"{source.file} has {len(ids):,} tokens; its last {held_out_tokens:,} are held out for the in-domain "
            f"perplexity, {held_out_tokens:,} before them for validation, and the rest calibrates: pass a longer "
            "file, or fewer or shorter --eval-windows"
        )
    return ids[: -2 * held_out_tokens], ids[-2 * held_out_tokens : -held_out_tokens], ids[-held_out_tokens:]


def run_compress(
    model_name: str,
    num_remove: int,
    select: str = "auto",
    recover: str = "ghosted",
    out=None,
    calib: TextSource | None = None,
    evaluation: TextSource | None = None,
    block: int = 256,
    calib_windows: int = 64,
    eval_windows: int = 16,
    num_clusters: int | None = None,
    ridge: float = 1e-6,
    new_tokens: int = 32,
    speed_repeats: int = 3,
    stage: Callable[[str], None] = print,
) -> dict:
    """Load ``model_name``, compress it, measure perplexity / parameters / generation speed before and after.

    ``select="auto"`` (the default, best across ``leantrain bench compress``) compares LoRP, ShortGPT and
    LLM-Streamline with recovery on the calibration source's validation slice and keeps the best.
    Calibrates on ``calib`` (default: Wikipedia prose; its train slice, or a file minus its held-out tail) and
    reports perplexity twice: on held-out text of the calibration source (in-domain) and on ``evaluation``
    (another source, by default :func:`~leantrain.prune.compress_args.default_eval_source`): recovery is fitted
    to its calibration domain.
    Writes the compressed model, its tokenizer and ``compress.json`` to ``out`` when given; returns the summary.
    Arguments are checked first (:func:`~leantrain.prune.compress_args.check_compress_args`), before any loading.
    """
    import copy
    from pathlib import Path

    from leantrain.models import build_model, load_tokenizer

    check_compress_args(model_name, num_remove, select, recover, out, block, calib_windows, eval_windows,
                        num_clusters, ridge)  # fmt: skip
    calib = calib if calib is not None else TextSource(DEFAULT_CALIB)
    evaluation = evaluation if evaluation is not None else default_eval_source(calib)
    stage(f"loading {model_name}, calibration text {calib.name}, evaluation text {evaluation.name}")
    model = build_model(model_name).eval()
    tokenizer = load_tokenizer(model_name)
    check_budget(num_remove, len(decoder_layers(model)), PROTECT)
    eval_tokens = block * eval_windows
    calib_ids, validation_ids, held_out_ids = source_streams(calib, tokenizer, eval_tokens)
    cross_ids = source_streams(evaluation, tokenizer, eval_tokens)[2]
    calibration = token_windows(calib_ids, block, calib_windows, where=f"the calibration text ({calib.name})")
    in_domain = token_windows(held_out_ids, block, eval_windows, where=f"the held-out slice of {calib.name}")
    cross = token_windows(cross_ids, block, eval_windows, where=f"the held-out slice of {evaluation.name}")
    stage(f"perplexity of the original model on {eval_windows} x {block} held-out tokens of each text")
    original = copy.deepcopy(model)
    ppl_before, cross_before = perplexity(original, in_domain), perplexity(original, cross)
    validation = (token_windows(validation_ids, block, AUTO_WINDOWS, where=f"the validation slice of {calib.name}")
                  if select == "auto" else None)  # fmt: skip
    result = compress_model(model, calibration, num_remove, select, recover, num_clusters=num_clusters, ridge=ridge,
                            on_stage=stage, validation=validation)  # fmt: skip
    stage("perplexity of the compressed model")
    ppl_after, cross_after = perplexity(result.model, in_domain), perplexity(result.model, cross)
    stage(f"generation speed: {new_tokens} new tokens, greedy, batch 1, interleaved x{speed_repeats}")
    prompt = torch.as_tensor(np.asarray(held_out_ids[:32], dtype=np.int64))[None]
    speed = tokens_per_second({"before": original, "after": result.model}, prompt, new_tokens, speed_repeats)
    ghosts = result.ghosts
    summary = {
        "model": model_name, "select": select, "selected": result.select, "recover": recover,
        "removed": result.removed,
        "layers_before": result.layers_before, "layers_after": result.layers_after,
        "params_before": parameter_count(original), "params_after": parameter_count(result.model),
        "perplexity_before": ppl_before, "perplexity_after": ppl_after,
        "perplexity_cross_before": cross_before, "perplexity_cross_after": cross_after,
        "tokens_per_s_before": speed["before"], "tokens_per_s_after": speed["after"],
        "speedup": speed["after"] / speed["before"], "selection": result.selection,
        "select_seconds": result.select_seconds, "fit_seconds": ghosts.fit_seconds if ghosts else 0.0,
        "ghost_relative_error": ghosts.relative_error if ghosts else [],
        "calibration_tokens": block * calib_windows, "evaluation_tokens": eval_tokens,
        "calibration_text": calib.name, "evaluation_text": evaluation.name,
        "torch_threads": torch.get_num_threads(),
    }  # fmt: skip
    if out is not None:
        out = Path(out)
        stage(f"saving to {out}")
        _save_whole(out, lambda folder: _write_folder(folder, result.model, tokenizer, summary))
        summary["out"] = str(out)
    return summary


def _write_folder(folder: Path, model, tokenizer, summary: dict) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "compress.json").write_text(json.dumps(summary, indent=1))


def _save_whole(out: Path, write) -> None:
    """``write(folder)`` into a hidden sibling of ``out``, then rename it to ``out``: an interrupted or failed save
    leaves no half-written model folder behind (and the empty ``out`` it may replace stays until the rename)."""
    import shutil

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir()
        write(partial)
        if out.is_dir():
            out.rmdir()  # the argument check allowed only an empty folder
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
