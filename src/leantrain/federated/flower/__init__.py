"""Run leantrain's federated algorithms on Flower (flwr 1.41, Message API): a Strategy, a ClientApp, an app
skeleton and loopback deployment helpers.

The same :class:`~leantrain.federated.algorithms.base.Algorithm` object drives both runtimes: the in-process
:class:`~leantrain.federated.simulator.Simulator` and, through this package, a Flower SuperLink with SuperNodes
(or Flower's simulation engine). A Flower run reproduces the simulator's run of the same configuration: the same
cohorts, the same client batches, the same global model and the same ledger bytes. See docs/flower.md.
"""

from leantrain.errors import MissingDependencyError

try:
    import flwr  # noqa: F401
except ImportError:  # pragma: no cover - exercised only without the [fl] extra
    raise MissingDependencyError("flwr (Flower)", 'pip install -c constraints.txt "leantrain[fl]"') from None

from leantrain.federated.flower.client_app import LeantrainClient, make_client_app
from leantrain.federated.flower.config import FlowerRunConfig
from leantrain.federated.flower.deployment import FlowerRunError, LocalDeployment, LocalSimulation
from leantrain.federated.flower.server_app import make_server_app
from leantrain.federated.flower.skeleton import write_app
from leantrain.federated.flower.strategy import LeantrainStrategy

__all__ = ["FlowerRunConfig", "FlowerRunError", "LeantrainClient", "LeantrainStrategy", "LocalDeployment",
           "LocalSimulation", "make_client_app", "make_server_app", "write_app"]  # fmt: skip
