"""The ``scoring`` part of ``leantrain bench finetune``: what each GEM scoring rule picks, on the recipe's own data.

For the MiniLM tweet recipe (``gem-minilm-tweets``: query/value, 0.1% of all weights, 1,000 scoring tweets) it runs
the scoring pass once per rule and reports :func:`leantrain.finetune.gem_analysis.mask_statistics`: the share of
picks among the smallest-|W| decile of their layer, the median |W| of the picks against all entries, and the share of
total |G| the mask captures against the most any mask with the same per-layer counts can capture. Rules: the
paper's |G|/(|W|+1e-8) with and without the head warm-up, the official gradient-only ablation (equal counts per
layer) and our floored score. Every rule starts from the same freshly built model (seed 0).
"""

from __future__ import annotations

from leantrain.bench.report import discard

RULES = {  # row name -> finetune overrides of the gem-minilm-tweets recipe
    "paper, random head": ("finetune.head_warmup_steps=0",),
    "paper, warmed-up head": (),
    "gradient-only (official ablation), warmed-up head": ("finetune.score=gradient", "finetune.allocation=uniform"),
    "floored |W| (ours), warmed-up head": ("finetune.score=grad_over_weight_floor",),
}


def scoring_rows(quick: bool, log, add=discard) -> list[dict]:
    import torch

    from leantrain.config import resolve
    from leantrain.finetune.gem import compute_gem_masks
    from leantrain.finetune.gem_analysis import mask_statistics
    from leantrain.finetune.methods import make_method_config
    from leantrain.models.build import build_model_for_data
    from leantrain.runs.supervised import first_batches, prepare_data
    from leantrain.train.tasks import TASKS

    rows = []
    for name, overrides in RULES.items():
        cfg = resolve(
            "gem-minilm-tweets", [*overrides, *(["data.train_subset=320", "score_samples=64"] if quick else [])]
        )
        torch.manual_seed(cfg.seed)
        data = prepare_data(cfg)
        task = TASKS[data.task]()
        model = build_model_for_data(cfg.model.name, cfg.model.options, data.model_fields)
        config = make_method_config("gem", cfg.finetune.options)
        masks = compute_gem_masks(model, first_batches(data.train, cfg.finetune.score_samples), config,
                                  loss_fn=lambda m, batch, task=task: task.loss(m, batch)[0])  # fmt: skip
        stats = mask_statistics(model, masks.gradients, masks)
        row = {
            "method": f"gem scoring: {name}", "anchor": False, "model": "minilm", "task": "tweets",
            "trainable_params": stats["picks"], "metric_name": "grad_mass_captured",
            "metric": stats["grad_mass_captured"],
            "extra": {k: v for k, v in stats.items() if k != "per_layer"}
            | {"per_layer_counts": {k: v["count"] for k, v in stats["per_layer"].items()},
               "head_warmup_losses": list(masks.head_warmup_losses), "overrides": list(overrides)},
        }  # fmt: skip
        log(f"  {name}: smallest-|W|-decile share {stats['smallest_decile_share']:.3f}, |G| captured "
            f"{stats['grad_mass_captured']:.3f} of at most {stats['grad_mass_top_gradient']:.3f}")  # fmt: skip
        rows.append(row)
        add(row)
    return rows


def scoring_table(rows: list[dict]) -> list[dict]:
    return [{"rule": r["method"].removeprefix("gem scoring: "), "picks": r["trainable_params"],
             "smallest_decile_share": r["extra"]["smallest_decile_share"],
             "median_abs_w_picks": r["extra"]["median_abs_weight_picks"],
             "median_abs_w_all": r["extra"]["median_abs_weight_all"], "grad_mass_captured": r["metric"],
             "grad_mass_best_same_counts": r["extra"]["grad_mass_top_gradient"]} for r in rows]  # fmt: skip
