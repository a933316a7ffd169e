"""Federated algorithms: plain classes that say what each client receives, trains and sends, and how the server
aggregates. The same objects run in leantrain's simulator and, through ``leantrain.federated.flower``, on Flower."""

from leantrain.federated.algorithms.base import Algorithm, ClientContext, Instruction, Reply
from leantrain.federated.algorithms.fedavg import FedAvg

ALGORITHMS: dict[str, type[Algorithm]] = {"fedavg": FedAvg}

__all__ = ["ALGORITHMS", "Algorithm", "ClientContext", "FedAvg", "Instruction", "Reply"]
