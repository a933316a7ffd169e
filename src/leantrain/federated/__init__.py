"""Federated learning: an in-process simulator (many clients, one working model, byte ledger, simulated clock),
layer-wise algorithms (FedAvg, FedLAMA, FedLUAR, partial averaging, EmbracingFL) and a Flower runtime for them."""

from leantrain.federated.algorithms import (
    ALGORITHMS,
    Algorithm,
    ClientContext,
    FedAvg,
    Instruction,
    Reply,
    make_algorithm,
)
from leantrain.federated.algorithms.base import train_client
from leantrain.federated.client import ClientData, LocalTraining, local_sgd
from leantrain.federated.clock import PROFILES, DeviceProfile, SimulatedClock
from leantrain.federated.comm import ByteLedger, decode_arrays, encode_arrays, wire_nbytes
from leantrain.federated.engines import ENGINES, make_engine
from leantrain.federated.intake import ReplyGuard, check_reply
from leantrain.federated.simulator import FederatedData, History, Simulator, federated_data

__all__ = [
    "ALGORITHMS", "PROFILES", "Algorithm", "ByteLedger", "ClientContext", "ClientData", "DeviceProfile", "FedAvg",
    "ENGINES", "FederatedData", "History", "Instruction", "LocalTraining", "Reply", "ReplyGuard", "SimulatedClock",
    "Simulator", "check_reply", "decode_arrays", "encode_arrays", "federated_data", "local_sgd", "make_algorithm",
    "make_engine", "train_client", "wire_nbytes",
]  # fmt: skip
