"""Our own Flower app skeleton, written by :func:`write_app` (``flwr new`` downloads templates; this works offline).

The app is a directory holding ``pyproject.toml`` (``[tool.flwr.app]`` with the components and the run config,
plus two federations) and a small package whose ``server_app.py`` / ``client_app.py`` call
:func:`make_server_app` / :func:`make_client_app`. Edit those two files to pass a custom ``model_fn``.

The templates are Python strings rather than package data files, so they ship with any install of leantrain.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from leantrain.errors import ConfigError
from leantrain.federated.flower.config import FlowerRunConfig

_PYPROJECT = """\
# A Flower app running a leantrain federated algorithm; written by leantrain.federated.flower.write_app.
# leantrain[fl] (and torch) must already be installed wherever the SuperLink and SuperNodes run: Flower's runtime
# `uv sync` of app dependencies is not used (it would fetch packages). Run commands: docs/flower.md.
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "1.0.0"
description = "leantrain {algorithm} on Flower"
license = "Apache-2.0"
dependencies = ["flwr[simulation]>=1.41,<1.42"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "{publisher}"

[tool.flwr.app.components]
serverapp = "{package}.server_app:app"
clientapp = "{package}.client_app:app"

# The run config both apps read (leantrain.federated.flower.FlowerRunConfig); override with
# `flwr run ... --run-config 'rounds=5 lr=0.1'`. Dicts are JSON strings. num-clients = number of SuperNodes.
[tool.flwr.app.config]
{config}
# Flower 1.41 moves these into $FLWR_HOME/config.toml on the first `flwr run` (and comments them out here).
[tool.flwr.federations]
default = "local-simulation"

[tool.flwr.federations.local-simulation]
options.num-supernodes = {num_clients}
options.backend.client-resources.num-cpus = 1

[tool.flwr.federations.local-deployment]
address = "{superlink}"
insecure = true
"""

_SERVER = '''\
"""ServerApp: leantrain's strategy for the algorithm in [tool.flwr.app.config]."""

from leantrain.federated.flower import make_server_app

# A custom model: app = make_server_app(model_fn=my_model_fn), and the same model_fn in client_app.py.
app = make_server_app()
'''

_CLIENT = '''\
"""ClientApp: the algorithm's client update on this node's partition (node config "partition-id")."""

from leantrain.federated.flower import make_client_app

# A custom model: app = make_client_app(model_fn=my_model_fn), and the same model_fn in server_app.py.
app = make_client_app()
'''


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string (JSON escapes are valid TOML)


def write_app(path: str | Path, config: FlowerRunConfig | None = None, *, package: str = "leantrain_app",
              publisher: str = "leantrain", superlink: str = "127.0.0.1:9092", overwrite: bool = False,
              **fields: Any) -> Path:  # fmt: skip
    """Write a Flower app directory for ``flwr run`` at ``path``; returns the path.

    The app's ``[tool.flwr.app.config]`` is ``config`` (default: ``FlowerRunConfig()``) with ``fields`` replaced
    (:class:`FlowerRunConfig` names: ``algorithm="fedluar"``, ``algorithm_options={...}``, ``rounds=...``,
    ``num_clients=...``, ``dataset=...``, ``local_steps=...``, ``lr=...``, ``seed=...``). ``superlink`` is the
    address of the ``local-deployment`` federation. Refuses to replace an existing ``pyproject.toml`` unless
    ``overwrite``.
    """
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", package):
        raise ConfigError(f"write_app package={package!r} is not a Python identifier")
    try:
        run = (config or FlowerRunConfig()).replace(**fields)
    except TypeError as err:
        raise ConfigError(f"write_app: {err}") from None
    root = Path(path)
    if (root / "pyproject.toml").exists() and not overwrite:
        raise ConfigError(f"{root / 'pyproject.toml'} exists; pass overwrite=True to replace the app")
    (root / package).mkdir(parents=True, exist_ok=True)
    table = "\n".join(f"{key} = {_toml_value(value)}" for key, value in run.to_run_config().items())
    name = re.sub(r"[^a-z0-9]+", "-", root.resolve().name.lower()).strip("-") or "leantrain-app"
    (root / "pyproject.toml").write_text(_PYPROJECT.format(
        name=name, algorithm=run.algorithm, publisher=publisher, package=package, config=table,
        num_clients=run.num_clients, superlink=superlink))  # fmt: skip
    (root / package / "__init__.py").write_text('"""A leantrain Flower app."""\n')
    (root / package / "server_app.py").write_text(_SERVER)
    (root / package / "client_app.py").write_text(_CLIENT)
    return root
