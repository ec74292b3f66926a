"""The ClientApp: trains the client whose id is this SuperNode's `partition-id` (`--node-config`)."""

from sparsyfed_app.task import client_spec
from sparsyfed_lightning.federated.flower_app import make_client_app

app = make_client_app(client_spec)
