"""What both node-side adapters share: where this node's data is, the run's configuration,
the model pool, and the one form of error reply a node sends.

``client/app.py`` (the Message-API handlers) and ``client/secagg.py`` (the SecAgg+ train path)
both import from here, so neither imports the other back.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message

from fedmsk.config import ExperimentConfig, compose, overrides_from_run_config
from fedmsk.data.dataset import DatasetPool
from fedmsk.site_runtime import ModelPool

SITE_FAILURE_CODE = 9001
NODE_CONFIG_DATA_DIR = "data-dir"
NODE_CONFIG_ALIAS = "site-alias"


# -- where this node's data is ---------------------------------------------------------------


class NodeConfigError(ValueError):
    """The SuperNode's own configuration (``--node-config``) does not say where the data is."""


def resolve_site(cfg: ExperimentConfig, node_config: dict[str, Any]) -> tuple[Path, str]:
    """The site directory and alias: from the node config (deployment) or partition id.

    In deployment the hospital's own node config names its data directory; the server never
    tells a node where data is. In simulation, ``partition-id`` picks the n-th site of the
    federation under ``data.root`` (sites in alias order).
    """
    if NODE_CONFIG_DATA_DIR in node_config:
        site_dir = Path(str(node_config[NODE_CONFIG_DATA_DIR])).expanduser()
        alias = str(node_config.get(NODE_CONFIG_ALIAS, site_dir.name))
        return site_dir, alias
    if "partition-id" not in node_config:
        raise NodeConfigError(
            f"node config has no {NODE_CONFIG_DATA_DIR!r}: start the SuperNode with "
            f"--node-config \"{NODE_CONFIG_DATA_DIR}='/path/to/site' "
            f"{NODE_CONFIG_ALIAS}='siteNN'\" (the folder `fedmsk data check` accepted)"
        )
    from fedmsk.data.federation import load_federation

    federation = load_federation(Path(cfg.data.root))
    sites = sorted(federation.sites, key=lambda s: s.alias)
    index = int(node_config["partition-id"])
    if index >= len(sites):
        raise IndexError(f"partition {index} has no site ({len(sites)} sites)")
    site = sites[index]
    return Path(cfg.data.root) / site.dir, site.alias


# A node process answers many messages of the same run: composing the Hydra config (~0.2 s)
# and building the model (~0.2 s for resnet18) once per process instead of once per message is
# a measurable share of a small site's round (docs/benchmarks.md, section 4).
_COMPOSED: dict[str, ExperimentConfig] = {}
MODEL_POOL = ModelPool()
# and validating the site's images (hash + cached array of each) once per process instead of
# once per message keeps a message's cost from growing with the hospital's data set
DATASET_POOL = DatasetPool()


def config_for(context: Context) -> ExperimentConfig:
    """The run's configuration; a private copy, so nothing a handler does leaks to the next."""
    run_config = dict(context.run_config)
    key = json.dumps(run_config, sort_keys=True, default=str)
    if key not in _COMPOSED:
        _COMPOSED.clear()  # one run at a time per process
        _COMPOSED[key] = compose(overrides_from_run_config(run_config))
    return copy.deepcopy(_COMPOSED[key])


def failure_reply(msg: Message, alias: str, error: BaseException) -> Message:
    """An error reply naming only the site alias and the error class."""
    reason = f"site={alias} error={type(error).__name__}"
    return Message(Error(code=SITE_FAILURE_CODE, reason=reason), reply_to=msg)
