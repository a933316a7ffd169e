"""Local SGD across workers of different speed on torch.distributed: synchronous SGD, uniform and biased local SGD.

:class:`HeteroTrainer` trains any classifier ``nn.Module`` on in-memory rows. Workers are spread over the processes
of the default process group (``leantrain.process_group``: spawned on one machine, or ``torchrun`` across machines;
gloo on CPU, NCCL on GPUs); with no group, one process hosts every worker, as the official code's rank 0 hosts all
CPU workers. Every process holds the full training set (datacenter training with IID data, not federated learning).

A round (biased local SGD, arXiv 2508.08540, official code jjihyunh/BiasedLocalSGD):

1. At a block's start (:mod:`leantrain.hetero.sampling`) every worker gets its rows for the next S rounds; with
   biased sampling the slow workers get the highest-loss rows.
2. Worker j takes ``H_j`` local SGD steps (momentum, weight decay; its momentum buffer stays local, as in the code);
   its busy time is accounted by the clock (virtual, or real with an emulated slowdown).
3. The models (parameters and floating buffers) are averaged with weights ``w_j`` (:func:`aggregation_weights`):
   every process sums ``w_j * x_j`` over its workers, an all-reduce SUM adds the processes' sums, and every worker
   continues from the average. Time blocked in the all-reduce is the worker's waiting time.

Synchronous SGD (``sync``) instead averages gradients every step: with one worker per process it is torch
``DistributedDataParallel`` (a comm hook times the all-reduce: the waiting); with several workers in a process, the
same average computed by hand (equal to DDP; tested). Its rounds are ``period_steps`` synchronous steps, so the stop
and evaluation decisions come at the same cadence as local SGD's.

Evaluation, stop requests (Ctrl-C, the time or epoch budget) are decided by every process together after a round.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from leantrain.errors import ConfigError
from leantrain.hetero.clock import VirtualClock, WallClock
from leantrain.hetero.methods import Method
from leantrain.hetero.sampling import LossScores, block_rows
from leantrain.hetero.schedule import aggregation_weights, check_slowdowns, proportional_steps, slow_workers
from leantrain.process_group import world


def averaged_tensors(model: nn.Module) -> list[torch.Tensor]:
    """What a model average covers: the parameters and the floating-point buffers (BatchNorm statistics)."""
    out = [p.data for p in model.parameters()]
    out += [b for b in model.buffers() if b.is_floating_point()]
    return out


def flatten(tensors: Sequence[torch.Tensor], device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).to(device, torch.float32) for t in tensors])


def unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    at = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[at : at + n].view_as(t))
        at += n


def weighted_average(models: Sequence[nn.Module], weights: Sequence[float], extra: Sequence[float] = (),
                     device: str = "cpu") -> tuple[list[float], float]:  # fmt: skip
    """Replace every model in ``models`` (this process's workers) by ``sum_j w_j x_j / sum_j w_j`` over ALL workers'
    models: the local weighted sum and the local weight, all-reduced (SUM) across the processes of the default
    group. ``extra`` numbers travel in the same all-reduce and come back summed over the processes. Returns (extra
    summed, seconds in the all-reduce)."""
    local = sum(w * flatten(averaged_tensors(m), device) for m, w in zip(models, weights, strict=True))
    tail = torch.tensor([float(sum(weights)), *map(float, extra)], dtype=torch.float32, device=local.device)
    local = torch.cat([local, tail])
    waited = 0.0
    if world()[1] > 1:
        started = time.perf_counter()
        dist.all_reduce(local)
        waited = time.perf_counter() - started
    n = local.numel() - tail.numel()
    average = local[:n] / local[n]
    for m in models:
        tensors = averaged_tensors(m)
        unflatten_into(average.to(tensors[0].device), tensors)
    return local[n + 1 :].cpu().tolist(), waited


class _AllReduceTimes:
    """State of :func:`timed_allreduce_hook`: the world size and the seconds spent in the all-reduce."""

    def __init__(self, size: int):
        self.size = size
        self.waited_s = 0.0


def timed_allreduce_hook(state: _AllReduceTimes, bucket):
    """DDP communication hook: the gradient all-reduce (mean), done synchronously and timed (the step's waiting)."""
    started = time.perf_counter()
    buffer = bucket.buffer().div_(state.size)
    dist.all_reduce(buffer)
    state.waited_s += time.perf_counter() - started
    done = torch.futures.Future()
    done.set_result(buffer)
    return done


class HeteroTrainer:
    """Train ``model_fn()`` on ``(x, y)`` with ``method`` over ``len(slowdowns)`` workers (see the module docstring).

    ``slowdowns[j]``: how many times slower worker j's step is than a speed-1 worker's. ``period_steps``: local
    steps of the fastest worker per round (the code's ``GPU_interval``, 32); ``clock``: "virtual" (deterministic,
    ``step_time_s`` per speed-1 step) or "real" (one process per worker, slowdowns emulated by sleeping).
    ``devices[j]``: where worker j trains ("cpu", "cuda:0", ...). ``emulate_slowdowns=False`` (real clock): no
    sleeping, for devices that really differ in speed (the slowdowns then only set the step counts).
    ``period_s`` (real clock, ``biased``): each worker takes local steps until it has been busy ``period_s`` seconds
    in the round (at least one), so its steps follow its actual speed, and the weights ``H_j ** beta`` use the steps
    it took; None: the steps fixed from the slowdowns.
    ``lr_milestones``: epochs after which the learning rate is multiplied by ``lr_gamma`` (the code: 0.1 at epochs
    60 and 80 of 100).
    """

    def __init__(self, model_fn: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor, method: Method,
                 slowdowns: Sequence[float], *, period_steps: int = 32, batch_size: int = 64, lr: float = 0.1,
                 momentum: float = 0.9, weight_decay: float = 1e-4, lr_milestones: Sequence[float] = (),
                 lr_gamma: float = 0.1, seed: int = 0, clock: str = "virtual", step_time_s: float = 0.01,
                 devices: Sequence[str] | None = None, emulate_slowdowns: bool = True,
                 period_s: float | None = None):  # fmt: skip
        self.slowdowns = check_slowdowns(slowdowns)
        self.method = method
        workers = len(self.slowdowns)
        self.rank, self.size = world()
        if self.size > workers:
            raise ConfigError(f"{self.size} processes for {workers} workers; give one slowdown per worker "
                              "(hetero.slowdowns) for at least as many workers as processes")  # fmt: skip
        if clock not in ("virtual", "real"):
            raise ConfigError(f"clock={clock!r} is invalid; expected 'virtual' or 'real'")
        if clock == "real" and self.size != workers:
            raise ConfigError(f"the real clock needs one process per worker ({workers}), not {self.size}: workers "
                              "sharing a process would wait for each other")  # fmt: skip
        if len(x) != len(y):
            raise ConfigError(f"x has {len(x)} rows but y has {len(y)}")
        self.hosted = [j for j in range(workers) if j % self.size == self.rank]
        self.devices = list(devices) if devices else ["cpu"] * workers
        if len(self.devices) != workers:
            raise ConfigError(f"{len(self.devices)} devices for {workers} workers; give one per worker")
        if method.every_step:
            self.steps = [1] * workers  # one step between synchronisations
        elif method.proportional:
            self.steps = proportional_steps(self.slowdowns, period_steps)
        else:
            self.steps = [period_steps] * workers
        self.steps_per_round = period_steps if method.every_step else 1  # synchronous steps per round
        if period_s is not None and (clock != "real" or not method.proportional):
            raise ConfigError("period_s (steps until a time budget) needs the real clock and the biased "
                              "method; on the virtual clock the slowdowns already give each worker the steps "
                              "that fit")  # fmt: skip
        self.period_s = period_s
        self.taken = list(self.steps)  # local steps each hosted worker took in the latest round
        self.weights = aggregation_weights(self.steps, method.beta)
        self.x, self.y = x, y
        self.batch_size, self.seed = batch_size, seed
        self.lr, self.lr_milestones, self.lr_gamma = lr, sorted(lr_milestones), lr_gamma
        if clock == "virtual":
            self.clock: VirtualClock | WallClock = VirtualClock(self.slowdowns, step_time_s)
        else:
            self.clock = WallClock(self.slowdowns, self.hosted, emulate_slowdowns)
        gloo = not dist.is_initialized() or dist.get_backend() == "gloo"  # gloo reduces CPU tensors here
        self.flat_device = "cpu" if gloo else self.devices[self.hosted[0]]
        # Small bookkeeping collectives (flags, statistics, the loss table) travel over gloo on the CPU; under NCCL
        # a gloo side group carries them.
        self.cpu_group = None if gloo else dist.new_group(backend="gloo")
        torch.manual_seed(seed)
        base = model_fn()
        if self.size > 1:  # every process starts from rank 0's model (as the official code broadcasts it)
            flat = flatten(averaged_tensors(base))
            dist.broadcast(flat, src=0, group=self.cpu_group)
            unflatten_into(flat, averaged_tensors(base))
        self.models = [copy.deepcopy(base).to(self.devices[j]) for j in self.hosted]
        self.optimizers = [torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
                           for m in self.models]  # fmt: skip
        self.ddp: nn.Module | None = None
        if method.every_step and self.size > 1 and len(self.hosted) == 1:
            from torch.nn.parallel import DistributedDataParallel

            device = torch.device(self.devices[self.hosted[0]])
            self.ddp = DistributedDataParallel(self.models[0], device_ids=[device] if device.type == "cuda" else None)
            self.hook = _AllReduceTimes(self.size)
            self.ddp.register_comm_hook(self.hook, timed_allreduce_hook)
        slow = slow_workers(self.steps) if method.biased_sampling else []
        self.scores = LossScores(len(y), len(self.hosted)) if slow else None
        self.slow = slow
        self.rows: list[np.ndarray] = []
        self.block, self.left_in_block, self.cursor = 0, 0, [0] * workers
        self.rounds = 0
        self.rows_read = 0  # by all workers
        self.loss_sum, self.loss_count = 0.0, 0

    # ------------------------------------------------------------------ data

    def _new_block(self) -> None:
        if self.scores is not None:
            self.scores.merge(self.cpu_group)
        rng = np.random.default_rng([self.seed, self.block])
        self.rows, rounds = block_rows(len(self.y), self.batch_size, self.steps, rng, self.scores, self.slow,
                                       self.method.pool_ratio)  # fmt: skip
        self.left_in_block = rounds
        self.cursor = [0] * len(self.steps)
        self.block += 1

    def _batch(self, worker: int) -> torch.Tensor:
        """The worker's next rows; with ``period_s`` a worker faster than its nominal steps cycles through its own."""
        at = self.cursor[worker]
        self.cursor[worker] = at + self.batch_size
        rows = self.rows[worker]
        if at + self.batch_size > len(rows):
            return torch.as_tensor(np.take(rows, np.arange(at, at + self.batch_size), mode="wrap"))
        return torch.as_tensor(rows[at : at + self.batch_size])

    def epoch(self) -> float:
        """Passes over the training rows so far (rows read by all workers / rows)."""
        return self.rows_read / len(self.y)

    def _set_lr(self) -> None:
        lr = self.lr * self.lr_gamma ** sum(1 for m in self.lr_milestones if self.epoch() >= m)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr

    # ------------------------------------------------------------------ steps

    def _losses(self, model: nn.Module, worker: int, rows: torch.Tensor) -> torch.Tensor:
        device = self.devices[worker]
        logits = model(self.x[rows].to(device))
        losses = F.cross_entropy(logits, self.y[rows].to(device), reduction="none")
        if self.scores is not None:
            self.scores.record(rows, losses, self.hosted.index(worker))
        self.loss_sum += float(losses.detach().sum())
        self.loss_count += len(rows)
        return losses.mean()

    def _step(self, model: nn.Module, opt: torch.optim.Optimizer, worker: int) -> None:
        loss = self._losses(model, worker, self._batch(worker))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def _local_steps(self, k: int) -> int:
        """Worker ``hosted[k]``'s local steps of one round; returns how many it took."""
        worker, model, opt = self.hosted[k], self.models[k], self.optimizers[k]
        model.train()
        if self.period_s is None:
            started = time.perf_counter()
            for _ in range(self.steps[worker]):
                self._step(model, opt, worker)
            self.clock.worked(worker, self.steps[worker], time.perf_counter() - started)
            return self.steps[worker]
        taken, busy_before = 0, self.clock.busy_s[worker]
        while taken == 0 or self.clock.busy_s[worker] - busy_before < self.period_s:
            started = time.perf_counter()
            self._step(model, opt, worker)
            self.clock.worked(worker, 1, time.perf_counter() - started)
            taken += 1
        return taken

    def _sync_step(self) -> float:
        """One synchronous step of every hosted worker; returns the seconds spent waiting in the all-reduce."""
        if self.ddp is not None:
            worker = self.hosted[0]
            self.ddp.train()
            self.hook.waited_s = 0.0
            started = time.perf_counter()
            loss = self._losses(self.ddp, worker, self._batch(worker))
            self.optimizers[0].zero_grad(set_to_none=True)
            loss.backward()
            self.optimizers[0].step()
            waited = self.hook.waited_s
            self.clock.worked(worker, 1, time.perf_counter() - started - waited)
            return waited
        grads = []
        for k, worker in enumerate(self.hosted):
            model = self.models[k]
            model.train()
            started = time.perf_counter()
            loss = self._losses(model, worker, self._batch(worker))
            model.zero_grad(set_to_none=True)
            loss.backward()
            grads.append(flatten([p.grad for p in model.parameters()], self.flat_device) * self.weights[worker])
            self.clock.worked(worker, 1, time.perf_counter() - started)
        total = torch.stack(grads).sum(0)
        waited = 0.0
        if self.size > 1:
            started = time.perf_counter()
            dist.all_reduce(total)
            waited = time.perf_counter() - started
        for model, opt in zip(self.models, self.optimizers, strict=True):
            params = list(model.parameters())
            unflatten_into(total.to(params[0].device), [p.grad for p in params])
            opt.step()
        return waited

    def train_round(self) -> None:
        """One round: ``period_steps`` synchronous steps (sync), or every worker's local steps and the average."""
        self._set_lr()
        if self.method.every_step:
            for _ in range(self.steps_per_round):
                if self.left_in_block == 0:
                    self._new_block()
                waited = self._sync_step()
                self.left_in_block -= 1
                self.rows_read += self.batch_size * len(self.steps)
                self.clock.round_done(self.steps, waited)
        else:
            if self.left_in_block == 0:
                self._new_block()
            self.taken = [self._local_steps(k) for k in range(len(self.hosted))]
            if self.period_s is None:
                weights = [self.weights[j] for j in self.hosted]
            else:  # by the steps actually taken (normalised over all workers by the all-reduce)
                weights = [float(h) ** self.method.beta for h in self.taken]
            (steps_taken,), waited = weighted_average(self.models, weights, extra=[sum(self.taken)],
                                                      device=self.flat_device)  # fmt: skip
            self.left_in_block -= 1
            self.rows_read += self.batch_size * round(steps_taken)
            self.clock.round_done(self.steps, waited)
        self.rounds += 1

    # ------------------------------------------------------------------ decisions, statistics, evaluation

    def decide(self, stop: bool, evaluate: bool) -> tuple[bool, bool]:
        """Stop if any process asks; evaluate when rank 0 says so (its clock rules)."""
        if self.size == 1:
            return stop, evaluate
        flags = torch.tensor([float(stop), float(evaluate and self.rank == 0)])
        dist.all_reduce(flags, group=self.cpu_group)
        return bool(flags[0] > 0), bool(flags[1] > 0)

    def worker_stats(self) -> dict[str, list]:
        """Per worker: steps, busy and waiting seconds (gathered from every process on the real clock)."""
        stats = torch.tensor([self.clock.steps, self.clock.busy_s, self.clock.wait_s], dtype=torch.float64)
        if self.size > 1 and self.clock.real:
            mask = torch.zeros(len(self.steps), dtype=torch.float64)
            mask[self.hosted] = 1.0
            stats = stats * mask
            dist.all_reduce(stats, group=self.cpu_group)
        return {"steps": [int(s) for s in stats[0]], "busy_s": stats[1].tolist(), "wait_s": stats[2].tolist()}

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> dict[str, float]:
        """Loss and accuracy of the (averaged) model on ``(x, y)``; rank 0's first worker's model."""
        from leantrain.train.loop import evaluate
        from leantrain.train.tasks import ClassificationTask

        device = self.devices[self.hosted[0]]
        batches = ({"x": x[i : i + batch_size].to(device), "labels": y[i : i + batch_size].to(device)}
                   for i in range(0, len(y), batch_size))  # fmt: skip
        return evaluate(self.models[0], ClassificationTask(), batches)

    def take_train_loss(self) -> float | None:
        """Mean training loss of this process's workers since the last call."""
        if self.loss_count == 0:
            return None
        out = self.loss_sum / self.loss_count
        self.loss_sum, self.loss_count = 0.0, 0
        return out if math.isfinite(out) else float("nan")

    def run(self, *, time_budget_s: float | None = None, epochs: float | None = None,
            eval_every_s: float | None = None, eval_fn: Callable[[], dict[str, float]] | None = None,
            on_eval: Callable[[dict], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> dict:  # fmt: skip
        """Train until ``time_budget_s`` (virtual or real seconds, evaluation excluded) or ``epochs`` passes, or a
        stop request; evaluate (``eval_fn`` on rank 0) at the start, every ``eval_every_s`` and at the end, each
        record handed to ``on_eval``. Returns the last record."""
        if time_budget_s is None and epochs is None:
            raise ConfigError("give a time budget (hetero.time_budget_s) or an epoch budget (hetero.epochs)")
        next_eval = 0.0

        def checkpoint() -> dict:
            with self.clock.paused():
                if self.size > 1:
                    dist.barrier(group=self.cpu_group)
                row = self._record(eval_fn)
                if self.size > 1:
                    dist.barrier(group=self.cpu_group)
            if on_eval is not None and self.rank == 0:
                on_eval(row)
            return row

        if self.clock.real:
            self._warm_up()
        record = checkpoint()  # ends with every process past a barrier: the training time starts here
        self.clock.restart()
        if eval_every_s:
            next_eval = eval_every_s
        while True:
            self.train_round()
            now = self.clock.elapsed() + 1e-9  # the virtual clock sums floats: 10 x 0.04 is 0.39999...
            spent = (time_budget_s is not None and now >= time_budget_s) or (epochs is not None and
                                                                            self.epoch() >= epochs)  # fmt: skip
            asked = bool(should_stop and should_stop())
            stop, due = self.decide(spent or asked, bool(eval_every_s) and now >= next_eval)
            if due or stop:
                record = checkpoint()
                record["stopped"] = asked and not spent
                while eval_every_s and next_eval <= now:
                    next_eval += eval_every_s
            if stop:
                return record

    def _warm_up(self) -> None:
        """One forward and backward pass on a throwaway copy of each worker's model (torch's lazy initialisation
        costs the first pass a second or more: start-up, not training time). The real models are untouched."""
        for k, worker in enumerate(self.hosted):
            model = copy.deepcopy(self.models[k])
            rows = torch.arange(min(self.batch_size, len(self.y)))
            F.cross_entropy(
                model(self.x[rows].to(self.devices[worker])), self.y[rows].to(self.devices[worker])
            ).backward()

    def _record(self, eval_fn: Callable[[], dict[str, float]] | None) -> dict:
        stats = self.worker_stats()
        elapsed = self.clock.elapsed()
        row = {"time_s": round(elapsed, 6), "round": self.rounds, "epoch": round(self.epoch(), 6),
               "steps": stats["steps"], "busy_s": [round(b, 6) for b in stats["busy_s"]],
               "wait_s": [round(w, 6) for w in stats["wait_s"]],
               "wait_share": round(sum(stats["wait_s"]) / max(elapsed * len(self.steps), 1e-12), 6),
               "train_loss": self.take_train_loss()}  # fmt: skip
        if eval_fn is not None and self.rank == 0:
            row.update(eval_fn())
        return row
