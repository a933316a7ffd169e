"""The generic leantrain Flower app: ``serverapp`` and ``clientapp`` configured entirely by the run config.

Point an app's ``[tool.flwr.app.components]`` here (``leantrain.federated.flower.app:serverapp`` and
``...:clientapp``), or use :func:`leantrain.federated.flower.write_app`, whose skeleton does so through two small
modules you can edit (e.g. to pass your own ``model_fn``).
"""

from leantrain.federated.flower.client_app import make_client_app
from leantrain.federated.flower.server_app import make_server_app

serverapp = make_server_app()
clientapp = make_client_app()
