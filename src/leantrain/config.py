"""Recipes: YAML files resolved into validated dataclass configs, with ``key=value`` overrides.

A recipe is data. ``leantrain run RECIPE key=value ...`` loads ``src/leantrain/recipes/RECIPE.yaml`` (or a
path to any YAML file), applies the overrides, validates every value against the dataclasses below and
the model's own config class, and writes the resolved config next to the results. An override key is
either a dotted path (``optim.lr=5e-5``, ``model.hidden=256``) or a leaf name that is unique across the
config (``lr=5e-5``). Every error names the key, the bad value and what is accepted.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from leantrain.errors import ConfigError
from leantrain.field_types import coerce, parse_text


def _f(default: Any, help: str, **checks: Any) -> Any:
    """A dataclass field with a help text and optional range checks (gt, ge, lt, le)."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **checks})
    return field(default=default, metadata={"help": help, **checks})


@dataclass
class DataConfig:
    dataset: str = _f("digits", "dataset name, see `leantrain list`")
    val_fraction: float = _f(0.1, "share of the training data held out for validation", ge=0.0, lt=1.0)
    test_fraction: float = _f(
        0.1, "share held out for test where the dataset has no official test split", ge=0.0, lt=1.0
    )
    train_subset: int | None = _f(None, "keep only this many (stratified) training samples", ge=1)
    eval_subset: int | None = _f(
        None, "evaluate on at most this many val/test samples (the first of each split)", ge=1
    )
    batch_size: int = _f(64, "training mini-batch size", ge=1)
    eval_batch_size: int = _f(256, "evaluation mini-batch size", ge=1)
    max_length: int = _f(128, "text classification: tokens per example after truncation", ge=2)
    block_size: int = _f(128, "language modelling: tokens per training window", ge=2)
    tokenizer: str | None = _f(
        None, "pretrained model whose tokenizer encodes text; None: the model's own, or characters"
    )


@dataclass
class ModelConfig:
    name: str = _f("mlp", "model name, see `leantrain list`")
    options: dict = _f({}, "keyword arguments of the model's config dataclass")


@dataclass
class FinetuneConfig:
    method: str = _f(
        "full", "full: train every weight; else a PEFT method (lora, gem, paca)",
        choices="leantrain.finetune.methods:METHODS",
    )  # fmt: skip
    options: dict = _f({}, "keyword arguments of the method's config (LoraConfig, GemConfig, PacaConfig)")
    score_samples: int = _f(1000, "GEM: training samples in the one gradient pass that picks the mask", ge=1)


@dataclass
class OptimConfig:
    name: str = _f(
        "adamw",
        "optimizer: sgd, adamw, adam, sam, lwsam, asyncsam (these three wrap optim.base), mlbfgs (lr, momentum, "
        "weight_decay + own fields)",
        choices="leantrain.optim.registry:OPTIMIZERS",
    )
    base: Literal["sgd", "adamw", "adam"] = _f("sgd", "sharpness-aware optimizers: the base optimizer they wrap")
    rho: float = _f(0.05, "sharpness-aware optimizers: radius of the perturbation", gt=0.0)
    adaptive: bool = _f(False, "sam: ASAM's scale-invariant perturbation (use a ~10x larger rho)")
    adaptive_form: Literal["official", "davda54"] = _f(
        "official", "sam/asyncsam ASAM T_w: official (|w| + adaptive_eta on weights, 1 on biases) or davda54 (|w|)"
    )
    adaptive_eta: float = _f(0.01, "sam/asyncsam ASAM, official form: eta of T_w = |w| + eta on weights", ge=0.0)
    num_layers: int = _f(3, "lwsam: how many critical layers are perturbed", ge=1)
    staleness: int = _f(1, "asyncsam: age in steps of the gradient the perturbation comes from (0: SAM)", ge=0)
    reselect_every: int | None = _f(None, "lwsam: re-choose the critical layers every N steps; None: each epoch", ge=1)
    select_after: int | None = _f(
        None, "lwsam: warm-up steps (plain steps, no second pass) before the first selection; None: the LR warm-up",
        ge=0,
    )  # fmt: skip
    second_pass: Literal["truncated", "masked"] = _f(
        "truncated", "lwsam: re-run only the layers after a replayed prefix (truncated) or the whole network (masked)"
    )
    mode: Literal["sequential", "two_process", "auto"] = _f(
        "sequential",
        "asyncsam: sequential (one process), two_process (the ascent on a second process and core), or auto "
        "(two_process when a second core is available, else sequential)",
    )
    ascent_batch_size: int | None = _f(
        None, "asyncsam: ascent batch b'; None: sequential reuses the descent batch, two_process sizes it", ge=1
    )
    on_miss: Literal["wait", "reuse"] = _f("wait", "asyncsam two_process: wait for a late ascent or reuse the last")
    slowdown: int = _f(1, "asyncsam two_process: emulate an s-times slower ascent device (real compute)", ge=1)
    worker_cpu: int | None = _f(None, "asyncsam two_process: pin the ascent process to this CPU core", ge=0)
    lr: float = _f(1e-3, "peak learning rate", gt=0.0)
    momentum: float = _f(0.9, "SGD momentum", ge=0.0, lt=1.0)
    nesterov: bool = _f(False, "SGD Nesterov momentum")
    weight_decay: float = _f(0.0, "weight decay (decoupled for adamw)", ge=0.0)
    betas: tuple[float, float] = _f((0.9, 0.999), "Adam betas")
    eps: float = _f(1e-8, "Adam epsilon", gt=0.0)
    update_freq: int = _f(50, "mlbfgs: T, a curvature pair every T steps (the first one after 2T)", ge=1)
    history_size: int = _f(10, "mlbfgs: m, curvature pairs kept per block", ge=1)
    beta: float = _f(0.999, "mlbfgs: EMA factor of both the parameters and the gradients", ge=0.0, lt=1.0)
    beta_pair: float = _f(0.9, "mlbfgs: double momentum on the curvature pairs (0: off)", ge=0.0, lt=1.0)
    damping: float = _f(0.01, "mlbfgs: Powell damping delta, phi <= 1 - delta", ge=0.0, lt=1.0)
    direction_scaling: Literal["global_norm", "kl_clip", "none"] = _f(
        "global_norm",
        "mlbfgs: global_norm (official; lr is the step length once a pair exists), kl_clip, or none (lr scales H*g)",
    )
    kl_clip: float | None = _f(None, "mlbfgs: c of direction_scaling=kl_clip, scale min(1, sqrt(c / g.Hg))", gt=0.0)


@dataclass
class TrainConfig:
    epochs: int = _f(1, "passes over the training data (ignored when max_steps is set)", ge=1)
    max_steps: int | None = _f(None, "train exactly this many optimizer steps, over as many epochs as needed", ge=1)
    schedule: Literal["constant", "cosine", "linear", "step"] = _f(
        "constant", "learning-rate decay after warm-up (step: times decay_factor at each of decay_epochs)"
    )
    decay_epochs: list[int] = _f([], "schedule=step: epochs at whose start the learning rate is multiplied")
    decay_factor: float = _f(0.1, "schedule=step: the multiplier at each decay epoch", gt=0.0)
    warmup_steps: int = _f(0, "linear warm-up steps", ge=0)
    grad_clip: float | None = _f(None, "clip the global gradient norm to this value", gt=0.0)
    log_every: int = _f(20, "log training metrics every N steps", ge=1)
    eval_every: int | None = _f(None, "evaluate on val every N steps (always at each epoch end)", ge=1)
    checkpoint_every: int | None = _f(None, "checkpoint every N steps (always at each epoch end and at the end)", ge=1)
    keep_checkpoints: int = _f(2, "how many recent checkpoints to keep", ge=1)


@dataclass
class FederatedConfig:
    algorithm: str | None = _f(
        None,
        "federated algorithm (fedavg, fedlama, fedluar, fedpa, embracingfl, kd, prism, timelyfl, fedbuff, gptfl); "
        "None: not a federated run",
        choices="leantrain.federated.algorithms:ALGORITHMS",
    )
    options: dict = _f({}, "keyword options of the algorithm (e.g. {phi: 2}, {recycled_layers: 2}, {groups: 10})")
    num_clients: int = _f(100, "clients the training data is split across", ge=1)
    clients_per_round: int = _f(10, "clients sampled per round", ge=1)
    rounds: int = _f(50, "communication rounds", ge=1)
    local_steps: int = _f(10, "local SGD steps per round (tau); lr/momentum/weight_decay from optim", ge=1)
    partition: Literal["iid", "dirichlet", "shards"] = _f("dirichlet", "how the training rows are split")
    alpha: float = _f(0.1, "Dirichlet concentration (partition=dirichlet)", gt=0.0)
    devices: dict = _f({}, "device profile shares, e.g. {weak: 0.5, moderate: 0.25}; the rest are strong")
    device_spread: dict = _f({}, "per-client lognormal profiles instead of devices, e.g. {compute_sigma: 1.0, "
                             "bandwidth_sigma: 1.0} (empty: off)")  # fmt: skip
    availability: float = _f(1.0, "probability a client is online in a round (the cohort is drawn from those)",
                             gt=0.0, le=1.0)  # fmt: skip
    time_budget_s: float | None = _f(None, "stop once the simulated clock reaches this many seconds", gt=0.0)
    unlabeled_share: float = _f(0.0, "share of the training rows held, without labels, by the strong clients "
                                "(on-device KD distils on them)", ge=0.0, lt=1.0)  # fmt: skip
    client_dropout: float = _f(0.0, "probability a sampled client never replies", ge=0.0, lt=1.0)
    client_failure: float = _f(0.0, "probability a sampled client crashes mid-training", ge=0.0, lt=1.0)
    eval_every: int = _f(5, "evaluate the global model on the test split every N rounds (and at the end)", ge=1)
    checkpoint_every: int = _f(1, "save the server state every N rounds (and at the end or on Ctrl-C)", ge=1)
    stop_after: int | None = _f(None, "stop after N rounds in all (continue later with resume=RUN_DIR)", ge=1)
    engine: str = _f("auto", "how a round's clients are trained (results do not depend on it): auto, sequential, "
                     "vmap", choices="leantrain.federated.engines:ENGINES")  # fmt: skip
    workers: int = _f(1, "worker processes the clients of a round are spread over (torch.distributed, gloo)", ge=1)
    guard_norm_ratio: float | None = _f(100.0, "reject a reply whose update norm exceeds this multiple of the "
                                        "cohort's median (None: off)", gt=1.0)  # fmt: skip
    max_examples: int | None = _f(None, "cap on the dataset size a client may claim (besides its known size)", ge=1)


@dataclass
class LowRankConfig:
    training: Literal["none", "full", "fixed", "dynamic"] = _f(
        "none",
        "none: off; full: dense training that logs the target layers' effective rank; fixed: low-rank factors "
        "throughout; dynamic: DRA's low-rank -> full -> adapter schedule",
    )
    rank_ratio: float = _f(0.5, "rank = floor(rank_ratio * output channels) of each target layer", gt=0.0, le=1.0)
    target_layers: list[str] = _f(
        [], "module-name patterns (fnmatch) of the target layers; empty: every layer where the rank saves compute"
    )
    switch_epochs: list[int] = _f(
        [], "dynamic: the two epochs where DRA inflates and deflates; empty: 55/150 and 120/150 of train.epochs"
    )
    deflate: Literal["adapter", "svd"] = _f(
        "adapter", "dynamic: the last phase, frozen W + zero-init adapter (official) or truncated SVD to rank r"
    )
    adapter_alpha: float = _f(16.0, "dynamic: the adapter's output is scaled by adapter_alpha / rank", gt=0.0)
    factor_init: Literal["random", "svd"] = _f(
        "random", "how the first low-rank factors start: random (training from scratch) or the dense weight's SVD"
    )


@dataclass
class PruneConfig:
    var_lam: float = _f(0.0, "VAR penalty weight lambda added to the loss (0: off)", ge=0.0)
    var_r: float = _f(1e-8, "VAR smoothing r of sqrt(w^2 + r)", ge=0.0)
    var_eps: float = _f(1e-8, "VAR epsilon of 1/(Var + eps)", ge=0.0)
    eval_sparsities: list[float] = _f(
        [], "after training, test accuracy after one-shot magnitude pruning at each sparsity (no retraining)"
    )
    prune_scope: Literal["global", "layer"] = _f("global", "eval_sparsities: rank weights globally or per layer")


@dataclass
class MarlConfig:
    env: str | None = _f(
        None,
        "multi-agent environment: matrix:climbing|penalty|nonmonotonic|shifting, lbf:<id>, rware:<id>, "
        "mpe:simple_spread|simple_tag, vmas:<scenario>; None: not a MARL run",
    )
    env_args: dict = _f({}, "keyword arguments of the environment (lbf: max_episode_steps; mpe:simple_tag: "
                        "n_predators, prey; vmas: the scenario's options)")  # fmt: skip
    algo: str = _f(
        "qmix",
        "learner: plain value decomposition (qmix, vdn), s2q, wall (training under the Wolfpack attack), fox, fim, "
        "ibal, mappo (on-policy actor-critic) or mappo-br (MAPPO best response to frozen partners)",
        choices="leantrain.marl.learners:LEARNERS",
    )
    mixer: str = _f("qmix", "mixing network", choices="leantrain.marl.networks:MIXERS")
    agent: str = _f("rnn", "agent network (shared by the agents)", choices="leantrain.marl.networks:AGENTS")
    max_steps: int = _f(20_000, "environment steps to train for", ge=1)
    n_envs: int = _f(8, "environments stepped in lockstep by the runner", ge=1)
    batch_episodes: int = _f(32, "episodes per learner update", ge=1)
    buffer_episodes: int = _f(5000, "replay capacity in episodes", ge=1)
    optimizer: Literal["rmsprop", "adam"] = _f("rmsprop", "learner optimizer (PyMARL: RMSprop; pymarl2: Adam)")
    lr: float = _f(5e-4, "learner learning rate", gt=0.0)
    gamma: float = _f(0.99, "discount", ge=0.0, le=1.0)
    td_lambda: float = _f(0.0, "TD(lambda) of the targets (0: one-step)", ge=0.0, le=1.0)
    grad_norm_clip: float = _f(10.0, "learner gradient-norm clip", gt=0.0)
    agent_hidden: int = _f(64, "GRU agent width", ge=1)
    epsilon_start: float = _f(1.0, "exploration at step 0", ge=0.0, le=1.0)
    epsilon_finish: float = _f(0.05, "exploration after the anneal", ge=0.0, le=1.0)
    epsilon_anneal_steps: int = _f(50_000, "environment steps of the linear epsilon decay", ge=1)
    target_update_episodes: int = _f(200, "hard target-network update every N episodes", ge=1)
    eval_every: int = _f(5_000, "greedy test episodes every N environment steps (and at the end)", ge=1)
    checkpoint_every: int | None = _f(
        None, "save the full state every N environment steps; None: after every evaluation", ge=1
    )
    test_episodes: int = _f(32, "greedy episodes per test", ge=1)
    log_every_episodes: int = _f(200, "a train record every N episodes", ge=1)
    switch_episode: int = _f(10_000, "matrix:shifting: training episodes (all environments) before the switch", ge=1)
    method_options: dict = _f({}, "options of the MARL method (S2Q, WALL, MAPPO, ...: its config dataclass)")
    pretrained_policy: str | None = _f(None, "start from this run folder's model.safetensors (agents and mixer)")
    snapshot_every: int | None = _f(
        None, "keep the policy every N environment steps, from the start, as policies/t_env-<t>.safetensors "
        "(FCP-style partner stages); None: only model.safetensors", ge=1
    )  # fmt: skip


@dataclass
class SbcConfig:
    population: int | None = _f(
        None, "SBC (state-blocked coordination): partners in the population, one per blocking set; None: not an "
        "SBC run", ge=1
    )  # fmt: skip
    units_per_set: int = _f(1, "blocked units per set (0: no blocking, an FCP-style population of seeds)", ge=0)
    block_kinds: list[str] = _f([], "unit kinds the sets are drawn from (destination; cell, pot, onion, dish, serve, "
                                "counter); empty: all")  # fmt: skip
    block_mode: Literal["penalty", "hard"] = _f(
        "penalty", "penalty: the partner's reward is r - c * 1[state in B]; hard: moves into B are no-ops"
    )
    block_penalty: float = _f(1.0, "c of the penalty mode", ge=0.0)
    include_empty: bool = _f(True, "the first set is empty: a self-play partner, also the self-play baseline")
    partner_steps: int = _f(100_000, "environment steps of each partner's (and held-out partner's) training", ge=1)
    partner_stages: int = _f(3, "policies kept per partner, evenly spaced over its training, the end included", ge=1)
    partner_start: bool = _f(False, "the untrained start is one of the stages (FCP keeps it: start, middle, end)")
    ego_options: dict = _f({}, "the ego's MAPPO options changed from marl.method_options (e.g. {entropy_coef: 0.05})")
    partner_agent: str = _f("random", "the agent a partner plays in the ego's episodes: random (per episode) or an "
                            "index (0, 1)")  # fmt: skip
    held_out_seeds: int = _f(2, "held-out self-play partners trained here, seeds held_out_seed, +1, ...", ge=0)
    held_out_seed: int = _f(1000, "seed of the first held-out partner (the population's are 10000 + 100 seed + i)",
                            ge=0)  # fmt: skip
    held_out: list[str] = _f([], "more held-out partners: run folders, policies/*.safetensors, scripted:<name>")
    crossplay_episodes: int = _f(32, "episodes per (policy, held-out partner), the partner as each agent in turn",
                                 ge=1)  # fmt: skip
    eval_env_args: dict = _f({}, "marl.env_args changed for cross-play (e.g. {shaped_reward: 0.0})")
    crossplay_actions: Literal["greedy", "sample"] = _f(
        "greedy", "cross-play episodes: both policies greedy, or both sampling from their softmax (Overcooked)"
    )


@dataclass
class HeteroConfig:
    method: str | None = _f(
        None,
        "how workers of different speed train together: sync (synchronous SGD), local-uniform (local SGD, one "
        "period), biased (biased local SGD); None: not a hetero run",
        choices="leantrain.hetero.methods:METHODS",
    )
    options: dict = _f({}, "options of the method (biased: beta, biased_sampling, pool_ratio)")
    slowdowns: list[float] = _f([1.0, 4.0], "one per worker: how many times slower its step is (1: full speed)")
    period_steps: int = _f(32, "local steps of the fastest worker between averages (sync: steps per round)", ge=1)
    clock: Literal["virtual", "real"] = _f(
        "virtual", "virtual: deterministic time from the slowdowns (no sleeping); real: wall-clock time, one process "
        "per worker, slowdowns emulated by sleeping"
    )  # fmt: skip
    emulate_slowdowns: bool = _f(True, "real clock: a slow worker sleeps (s - 1) x its compute; false on devices "
                                 "that really differ (the slowdowns then only set the local steps)")  # fmt: skip
    period_s: float | None = _f(None, "real clock, biased: each worker steps until it has been busy this many "
                                "seconds per round (steps follow real speed); None: steps from the slowdowns",
                                gt=0.0)  # fmt: skip
    processes: int | None = _f(None, "processes the workers run in; None: one per worker on the real clock, one on "
                               "the virtual clock", ge=1)  # fmt: skip
    step_time_s: float = _f(0.01, "virtual clock: seconds of one step of a full-speed worker", gt=0.0)
    time_budget_s: float | None = _f(None, "stop after this many (virtual or real) seconds, evaluation excluded",
                                     gt=0.0)  # fmt: skip
    epochs: float | None = _f(None, "stop after this many passes over the training rows (by all workers)", gt=0.0)
    eval_every_s: float | None = _f(None, "evaluate every N seconds of training time (and at the start and end)",
                                    gt=0.0)  # fmt: skip
    eval_split: Literal["test", "val"] = _f("test", "the rows evaluated (val: to choose hyperparameters)")
    lr_milestones: list[float] = _f([], "epochs after which the learning rate is multiplied by lr_gamma")
    lr_gamma: float = _f(0.1, "learning-rate decay factor at each milestone", gt=0.0, le=1.0)
    devices: list[str] = _f([], "one per worker: cpu, cuda, cuda:1, ... (empty: every worker on the CPU)")
    backend: Literal["auto", "gloo", "nccl"] = _f("auto", "collectives: auto (nccl when every worker is on a GPU)")
    collective_timeout_s: float = _f(300.0, "a collective waiting longer for a peer fails with an error", gt=0.0)


@dataclass
class RunConfig:
    name: str = _f("run", "run name (no path separators); the run folder is <output_dir>/<name>-<timestamp>")
    task: Literal["auto", "classification", "language-modeling"] = _f("auto", "auto: from the dataset kind")
    seed: int = _f(0, "seed for splits, init, data order and dropout", ge=0)
    threads: int | None = _f(None, "torch.set_num_threads; None: torch's default", ge=1)
    output_dir: str = _f("runs", "parent folder of run folders")
    resume: str | None = _f(None, "a run folder to continue from its latest checkpoint")
    progress: Literal["auto", "bar", "plain", "none"] = _f("auto", "auto: a bar on a terminal, log lines otherwise")
    log_formats: list[str] = _f(
        ["jsonl"], "metric files: jsonl (always), csv (metrics-<split>.csv), tensorboard (<run>/tensorboard/)",
        choices="leantrain.train.metric_loggers:LOG_FORMATS",
    )  # fmt: skip
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    lowrank: LowRankConfig = field(default_factory=LowRankConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    marl: MarlConfig = field(default_factory=MarlConfig)
    sbc: SbcConfig = field(default_factory=SbcConfig)
    hetero: HeteroConfig = field(default_factory=HeteroConfig)


SECTIONS = {
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "federated": FederatedConfig,
    "lowrank": LowRankConfig,
    "prune": PruneConfig,
    "marl": MarlConfig,
    "sbc": SbcConfig,
    "hetero": HeteroConfig,
}


# ---------------------------------------------------------------- recipes


def recipes_dir() -> Path:
    return Path(str(resources.files("leantrain") / "recipes"))


def list_recipes() -> dict[str, str]:
    """Shipped recipe names with the first line of their description."""
    out = {}
    for path in sorted(recipes_dir().glob("*.yaml")):
        raw = yaml.safe_load(path.read_text()) or {}
        out[path.stem] = str(raw.get("description", "")).strip().splitlines()[0] if raw.get("description") else ""
    return out


def load_recipe(recipe: str) -> dict:
    """The raw mapping of a shipped recipe name or a path to a YAML file."""
    path = Path(recipe)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = recipes_dir() / f"{recipe}.yaml"
        if not path.is_file():
            names = list(list_recipes())
            raise ConfigError(
                f"unknown recipe {recipe!r}{_did_you_mean(recipe, names)}; choose from: {', '.join(names)}"
            )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"recipe {path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"recipe {path} cannot be read ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise ConfigError(f"recipe {path} is not valid YAML{at}: {getattr(err, 'problem', None) or err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path} must be a mapping of keys to values")
    raw.pop("description", None)
    raw.setdefault("name", path.stem)
    return raw


def resolve(recipe: str | dict, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a recipe, apply ``key=value`` overrides and return the validated :class:`RunConfig`."""
    raw = load_recipe(recipe) if isinstance(recipe, str) else dict(recipe)
    cfg = from_dict(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=0.01)")
        cfg = apply_override(cfg, key.strip(), parse_text(value))
    return cfg


def from_dict(raw: dict) -> RunConfig:
    """Build and validate a RunConfig from a nested mapping (a recipe or a saved config.yaml)."""
    raw = dict(raw)
    kwargs: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        kwargs[section] = _build(cls, raw.pop(section, None) or {}, section)
    model_raw = dict(raw.pop("model", None) or {})
    model_name = coerce(model_raw.pop("name", ModelConfig.name), str, "model.name")
    model_raw.update(model_raw.pop("options", None) or {})
    kwargs["model"] = ModelConfig(name=model_name, options=validate_model_options(model_name, model_raw))
    kwargs["finetune"] = _build_finetune(dict(raw.pop("finetune", None) or {}))
    top = {f.name for f in dataclasses.fields(RunConfig)} - set(SECTIONS) - {"model", "finetune"}
    for key in raw:
        if key not in top:
            raise ConfigError(_unknown_key(key, sorted(top | set(SECTIONS) | {"model", "finetune"})))
    scalars = _build_scalars(RunConfig, raw, top)
    _check_run_name(scalars.get("name", RunConfig.name))
    _check_names(kwargs["data"])
    _check_lowrank_prune(kwargs["lowrank"], kwargs["prune"])
    _check_marl(kwargs["marl"])
    return RunConfig(**scalars, **kwargs)


def _check_run_name(name: str) -> None:
    """A run name becomes a folder name under output_dir: no separators, no "..", nothing hidden or empty."""
    if not name or "/" in name or "\\" in name or ".." in name or name.startswith(".") or "\0" in name:
        raise ConfigError(
            f"config: name={name!r} is not a valid run name; use letters, digits, '-', '_' and single dots "
            "(no path separators or '..': the run folder is always created inside output_dir)"
        )


def _check_marl(marl: MarlConfig) -> None:
    from leantrain.marl.envs import ENVIRONMENTS

    if marl.env is not None and marl.env.partition(":")[0] not in ENVIRONMENTS:
        raise ConfigError(
            f"config: unknown environment {marl.env!r} in marl.env; use one of the kinds {', '.join(ENVIRONMENTS)} "
            "as <kind>:<name> (matrix:climbing, lbf:<id>, rware:<id>, mpe:simple_spread, mpe:simple_tag, "
            "vmas:<scenario>)"
        )


def _check_lowrank_prune(lowrank: LowRankConfig, prune: PruneConfig) -> None:
    bad = [s for s in prune.eval_sparsities if not 0 <= s < 1]
    if bad:
        raise ConfigError(f"config: prune.eval_sparsities has {bad!r}; every sparsity must be in [0, 1)")
    switches = list(lowrank.switch_epochs)
    if switches and (len(switches) != 2 or not 0 < switches[0] < switches[1]):
        raise ConfigError(
            f"config: lowrank.switch_epochs={switches!r} must be two increasing epochs > 0 (inflate, deflate), "
            "or empty for the official 55/150 and 120/150 of train.epochs"
        )
    if prune.var_lam > 0 and lowrank.training == "dynamic":
        raise ConfigError(
            "config: prune.var_lam with lowrank.training=dynamic is not supported (the schedule swaps the layers "
            "the penalty reads)"
        )


def _build_finetune(raw: dict) -> FinetuneConfig:
    """``method`` and ``score_samples`` are ours; every other key is an option of the method's config."""
    from leantrain.finetune.methods import make_method_config

    own = {k: raw.pop(k) for k in ("method", "score_samples") if k in raw}
    raw.update(raw.pop("options", None) or {})
    cfg = FinetuneConfig(**_build_scalars(FinetuneConfig, own, set(own), prefix="finetune."), options=raw)
    cfg.options = _coerce_method_options(cfg.method, cfg.options)
    make_method_config(cfg.method, cfg.options)
    return cfg


def _coerce_method_options(method: str, options: dict) -> dict:
    """Numbers and booleans given as text (``finetune.density=1e-2`` arrives as the string "1e-2": YAML 1.1 reads a
    float only with a dot) become the type the method config's field declares; other fields pass unchanged."""
    from leantrain.finetune.methods import method_config_class

    cls = method_config_class(method)
    if cls is None:
        return options
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 -- a third-party config whose annotations do not resolve: leave it as given
        return options
    out = dict(options)
    for key, value in options.items():
        hint = hints.get(key)
        plain = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_args(hint) else [hint]
        if isinstance(value, str) and len(plain) == 1 and plain[0] in (int, float, bool):
            out[key] = coerce(value, hint, f"finetune.{key}")
    return out


def _check_names(data: DataConfig) -> None:
    from leantrain.data import dataset_options
    from leantrain.models import tokenizer_names

    dataset_options(data.dataset)  # raises on an unknown dataset, listing the valid ones
    if data.tokenizer is not None and data.tokenizer not in tokenizer_names():
        choices = ", ".join(tokenizer_names())
        raise ConfigError(f"config: data.tokenizer={data.tokenizer!r} is not a pretrained tokenizer; use {choices}")


def to_dict(cfg: RunConfig, used_only: bool = False) -> dict:
    """The nested mapping of ``cfg`` (model options flattened into the model section); ``used_only`` keeps just
    the keys its run kind reads (what ``--print-config`` shows and ``config.yaml`` holds)."""
    out = dataclasses.asdict(cfg)
    out["model"] = {"name": cfg.model.name, **cfg.model.options}
    ft = cfg.finetune
    out["finetune"] = {"method": ft.method, "score_samples": ft.score_samples, **ft.options}
    for section in SECTIONS:
        out[section] = {k: list(v) if isinstance(v, tuple) else v for k, v in out[section].items()}
    if not used_only:
        return out
    from leantrain.runs.kinds import kind_of

    kind = kind_of(cfg)
    kept = {}
    for key, value in out.items():
        if isinstance(value, dict) and key in (*SECTIONS, "model", "finetune"):
            inner = {k: v for k, v in value.items() if kind.uses_key(f"{key}.{k}") or kind.uses_key(key)}
            if inner:
                kept[key] = inner
        elif kind.uses_key(key):
            kept[key] = value
    return kept


def flatten(mapping: dict, prefix: str = "") -> dict:
    """A nested config mapping as dotted keys (``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}``); an empty section
    stays one key."""
    out = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def save(cfg: RunConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg, used_only=True), sort_keys=False))


def apply_override(cfg: RunConfig, key: str, value: Any) -> RunConfig:
    """Return a copy of ``cfg`` with one dotted or unique-leaf key set (validated)."""
    path = _expand_key(cfg, key)
    raw = to_dict(cfg)
    node = raw
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return from_dict(raw)


# ---------------------------------------------------------------- model options


def validate_model_options(name: str, options: dict) -> dict:
    """Validate model keyword arguments with the model's own config dataclass; return them coerced."""
    from leantrain.models import make_model_config

    config = make_model_config(name, **options)
    values = {k: getattr(config, k) for k in options}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


# ---------------------------------------------------------------- validation


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"config: {where} must be a mapping, got {raw!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise ConfigError(_unknown_key(f"{where}.{key}", sorted(f"{where}.{n}" for n in names)))
    return cls(**_build_scalars(cls, raw, names, prefix=f"{where}."))


def _build_scalars(cls: type, raw: dict, names: set[str], prefix: str = "") -> dict:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in names and f.name in raw:
            where = prefix + f.name
            value = coerce(raw[f.name], hints[f.name], where)
            _check_range(value, f.metadata, where)
            _check_choice(value, f.metadata, where)
            out[f.name] = value
    return out


def registry_names(spec: str) -> list[str]:
    """The names in a registry given as "module:attribute" (imported on use: the CLI's help stays fast)."""
    import importlib

    module, attr = spec.split(":")
    return list(getattr(importlib.import_module(module), attr))


def _check_choice(value: Any, meta: Any, where: str) -> None:
    """Names that come from a registry (optimizers, federated algorithms, MARL learners, ...) must be registered."""
    if value is None or "choices" not in meta:
        return
    names = registry_names(meta["choices"])
    for item in value if isinstance(value, list | tuple) else [value]:
        if item not in names:
            raise ConfigError(
                f"config: {where} = {item!r} is not one of: {', '.join(names)}{_did_you_mean(str(item), names)}"
            )


def _check_range(value: Any, meta: Any, where: str) -> None:
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return
    tests = {
        "gt": (lambda v, b: v > b, ">"),
        "ge": (lambda v, b: v >= b, ">="),
        "lt": (lambda v, b: v < b, "<"),
        "le": (lambda v, b: v <= b, "<="),
    }
    for name, (ok, _sym) in tests.items():
        if name in meta and not ok(value, meta[name]):
            bounds = " and ".join(f"{sym} {meta[n]}" for n, (_, sym) in tests.items() if n in meta)
            raise ConfigError(f"config: {where} = {value!r} is out of range (must be {bounds})")


def override_path(cfg: RunConfig, key: str) -> str:
    """The dotted config key an override ``key`` (dotted, or a unique leaf name) sets on ``cfg``'s kind."""
    return ".".join(_expand_key(cfg, key))


def _expand_key(cfg: RunConfig, key: str) -> list[str]:
    """Map a dotted or unique-leaf key to its path among the keys ``cfg``'s run kind reads. A key of another kind,
    an unknown or an ambiguous key raises with what to use instead."""
    from leantrain.runs.kinds import equivalent_key, kind_of

    kind = kind_of(cfg)
    paths = _all_paths(cfg)
    used = {dotted: path for dotted, path in paths.items() if kind.accepts_override(dotted)}
    if key in used:
        return used[key]
    matches = [dotted for dotted in used if dotted.rsplit(".", 1)[-1] == key]
    if len(matches) == 1:
        return used[matches[0]]
    if len(matches) > 1:
        raise ConfigError(f"override key {key!r} is ambiguous; use one of: {', '.join(sorted(matches))}")
    elsewhere = [key] if key in paths else sorted(d for d in paths if d.rsplit(".", 1)[-1] == key)
    if elsewhere:
        instead = equivalent_key(elsewhere[0], kind)
        hint = f"; use {instead}" if instead else f"; {_unknown_key(key, sorted(used)).split('; ', 1)[1]}"
        raise ConfigError(f"{elsewhere[0]} is not used by {kind.name} recipes (this recipe: {cfg.name}){hint}")
    raise ConfigError(_unknown_key(key, sorted(used)))


def _all_paths(cfg: RunConfig) -> dict[str, list[str]]:
    from leantrain.finetune.methods import method_config_class
    from leantrain.models import model_config_class

    nested = (*SECTIONS, "model", "finetune")
    paths = {f.name: [f.name] for f in dataclasses.fields(RunConfig) if f.name not in nested}
    for section, cls in SECTIONS.items():
        paths.update({f"{section}.{f.name}": [section, f.name] for f in dataclasses.fields(cls)})
    paths["model.name"] = ["model", "name"]
    for f in dataclasses.fields(model_config_class(cfg.model.name)):
        paths[f"model.{f.name}"] = ["model", f.name]
    paths.update({f"finetune.{k}": ["finetune", k] for k in ("method", "score_samples")})
    method_cls = method_config_class(cfg.finetune.method)
    for f in dataclasses.fields(method_cls) if method_cls else ():
        paths.setdefault(f"finetune.{f.name}", ["finetune", f.name])
    return paths


def _close_matches(key: str, choices: list[str], n: int = 5) -> list[str]:
    by_leaf: dict[str, list[str]] = {}
    for c in choices:
        by_leaf.setdefault(c.rsplit(".", 1)[-1], []).append(c)
    close = difflib.get_close_matches(key, choices, n=n, cutoff=0.6)
    for leaf in difflib.get_close_matches(key.rsplit(".", 1)[-1], list(by_leaf), n=n, cutoff=0.6):
        close += [c for c in by_leaf[leaf] if c not in close]
    return close[:n]


def _did_you_mean(key: str, choices: list[str]) -> str:
    close = _close_matches(key, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown_key(key: str, choices: list[str]) -> str:
    close = _close_matches(key, choices)
    hint = f"did you mean: {', '.join(close)}?" if close else "no key is close to it"
    return f"unknown config key {key!r}; {hint} (`leantrain run RECIPE --print-config` shows every key)"
