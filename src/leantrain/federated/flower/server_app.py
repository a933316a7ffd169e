"""The ServerApp: :class:`LeantrainStrategy` for the run's config, its history written as JSON.

``make_server_app()`` reads everything from ``context.run_config`` (the app's ``[tool.flwr.app.config]``); with
``result-path`` set, the ServerApp writes the strategy's history (per-round rows, totals, byte ledger, the client to
node map) there when the run ends, also when it fails (then with ``"status": "failed: ..."``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from torch import nn

from leantrain.federated.flower.config import FlowerRunConfig
from leantrain.federated.flower.strategy import LeantrainStrategy


def write_history(path: str | Path, history: dict[str, Any]) -> Path:
    """Write ``history`` as JSON atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(history, indent=1, default=str))
    os.replace(tmp, path)
    return path


def make_server_app(
    config: FlowerRunConfig | None = None, model_fn: Callable[[], nn.Module] | None = None
) -> ServerApp:
    """A Flower ``ServerApp`` running :class:`LeantrainStrategy`.

    ``config`` fixes the run's settings (None: ``context.run_config``); ``model_fn`` builds a custom model (None:
    ``config.model`` from ``leantrain.models``). Pass the same values to :func:`make_client_app`.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run = config if config is not None else FlowerRunConfig.from_run_config(dict(context.run_config))
        if run.torch_threads:
            torch.set_num_threads(run.torch_threads)  # the server-side evaluation, like the ClientApps
        strategy = LeantrainStrategy.from_config(run, model_fn)
        status = "failed: interrupted"
        try:
            strategy.start(grid=grid, num_rounds=run.rounds, timeout=run.round_timeout_s)
            status = "completed"
        except Exception as err:
            status = f"failed: {type(err).__name__}: {err}"
            raise
        finally:
            if run.result_path:
                write_history(run.result_path, {"status": status, "config": run.to_run_config(),
                                                **strategy.history()})  # fmt: skip

    return app
