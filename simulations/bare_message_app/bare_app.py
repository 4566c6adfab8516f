"""A bare Flower Message-API app, the yardstick for fedmsk's deployment overhead.

Same model (the slim ResNet-18 of configs/model/resnet18_slim.yaml, built with timm), same
arrays on the wire and the same local steps as a fedmsk round, but none of fedmsk's work around
them: no configuration, no site data, no checks. What a round costs here beyond the clients'
own compute is what Flower and a Python process per message cost by themselves.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

SLIM_RESNET18 = {
    "channels": [32, 64, 128, 256],
    "output_stride": 16,
    "global_pool": "max",
}

server_app = ServerApp()
client_app = ClientApp()


def build_model():  # type: ignore[no-untyped-def]
    import timm

    return timm.create_model(
        "resnet18", pretrained=False, num_classes=2, in_chans=1, **SLIM_RESNET18
    )


def model_arrays(model) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def to_record(arrays: dict[str, np.ndarray], pack: bool) -> ArrayRecord:
    """One Array per tensor, as fedmsk sends them; or, with ``pack``, every tensor in one
    float64 Array (what a message costs when Flower moves one object instead of ~100)."""
    if not pack:
        return ArrayRecord(
            OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in arrays.items())
        )
    flat = np.concatenate([v.astype(np.float64).ravel() for v in arrays.values()])
    return ArrayRecord(OrderedDict(packed=Array(flat)))


def from_record(record: ArrayRecord, like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if "packed" not in record:
        return {k: a.numpy() for k, a in record.items()}
    flat, out, at = record["packed"].numpy(), {}, 0
    for key, value in like.items():
        out[key] = flat[at : at + value.size].reshape(value.shape).astype(value.dtype)
        at += value.size
    return out


@client_app.train()
def train(message: Message, context: Context) -> Message:
    import torch

    config = message.content["config"]
    model = build_model()
    pack = bool(config["pack"])
    arrays = from_record(message.content["arrays"], model_arrays(model))
    model.load_state_dict({k: torch.from_numpy(a) for k, a in arrays.items()})
    torch.set_num_threads(1)
    size, batch = int(config["image-size"]), int(config["batch-size"])
    images, labels = torch.rand(batch, 1, size, size), torch.arange(batch) % 2
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    begin = time.perf_counter()
    for _ in range(int(config["steps"])):
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    seconds = time.perf_counter() - begin
    out = to_record(model_arrays(model), pack)
    metrics = MetricRecord({"num-examples": batch, "train-seconds": seconds})
    return Message(RecordDict({"arrays": out, "metrics": metrics}), reply_to=message)


def _prompt_exchange(grid: Grid, messages: list[Message]) -> list[Message]:
    pending = {mid for mid in grid.push_messages(messages) if mid}
    replies: list[Message] = []
    pause = 0.01
    while pending:
        arrived = list(grid.pull_messages(pending))
        replies += arrived
        pending.difference_update(m.metadata.reply_to_message_id for m in arrived)
        if pending:
            time.sleep(pause)
            pause = min(0.1, pause * 1.5)
    return replies


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    from flwr.app import ConfigRecord

    cfg = context.run_config
    wanted = int(cfg["nodes"])
    deadline = time.monotonic() + 300
    nodes = sorted(grid.get_node_ids())
    while len(nodes) < wanted and time.monotonic() < deadline:
        time.sleep(0.5)
        nodes = sorted(grid.get_node_ids())
    nodes = nodes[:wanted]
    arrays = model_arrays(build_model())
    config = ConfigRecord({k: cfg[k] for k in ("steps", "batch-size", "image-size", "pack")})
    rounds = []
    for server_round in range(1, int(cfg["rounds"]) + 1):
        begin = time.perf_counter()  # a round: send, train, receive, aggregate (as fedmsk's)
        record = to_record(arrays, bool(cfg["pack"]))
        messages = [
            Message(
                RecordDict({"arrays": record, "config": config}),
                dst_node_id=node,
                message_type=MessageType.TRAIN,
            )
            for node in nodes
        ]
        if cfg["poll"] == "flower":
            replies = list(grid.send_and_receive(messages, timeout=600))
        else:
            replies = _prompt_exchange(grid, messages)
        good = [r for r in replies if not r.has_error()]
        if len(good) != len(nodes):
            raise RuntimeError(f"round {server_round}: {len(good)} of {len(nodes)} replies")
        compute = [float(r.content["metrics"]["train-seconds"]) for r in good]
        total = {k: np.zeros_like(v) for k, v in arrays.items()}
        for reply in good:
            for key, value in from_record(reply.content["arrays"], arrays).items():
                total[key] = total[key] + value
        arrays = {k: (v / len(good)).astype(arrays[k].dtype) for k, v in total.items()}
        wall = time.perf_counter() - begin
        rounds.append({"round": server_round, "wall": wall, "compute": compute})
    if cfg["out"]:
        Path(str(cfg["out"])).write_text(json.dumps({"nodes": len(nodes), "rounds": rounds}))
