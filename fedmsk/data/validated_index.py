"""A site's validated rows, remembered next to its image cache.

In a Flower deployment every message starts a fresh ClientApp process, so the in-process
:class:`fedmsk.data.dataset.DatasetPool` starts empty each time and the site's rows were
validated again per message: a stat, a hash memo and a cached array read per image, about 0.3 ms
each (3.2 s per message at 10,000 images; ``simulations/bench_message.py``). This index keeps
the outcome of one full validation (each usable image's content hash, class, patient, view and
the file's stat signature) so that a fresh process only checks that every file still has the
signature it had and that its cached array is still there (two stats per image).

The index is trusted only when the manifest and every setting that shapes the datasets are
unchanged (its file name is a hash of them) and no file changed since; anything else falls
back to full validation, which writes a new index. A site with unreadable images is never
indexed, so each message still reports them in the node's log. The index lives in the site's
cache directory, on the node, like the cache itself: it names files and patients.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any

from fedmsk.data.cache import PreprocessCache, settled, stat_signature
from fedmsk.run_dir import atomic_write_bytes

INDEX_VERSION = 2


def index_path(cache: PreprocessCache, settings: Any) -> Path:
    """Where the index for these settings lives; ``settings`` must be JSON-able."""
    blob = json.dumps([INDEX_VERSION, settings], sort_keys=True, default=str).encode()
    return cache.root / "validated" / f"{hashlib.sha256(blob).hexdigest()[:24]}.json"


def save_index(
    path: Path, site_dir: Path, splits: dict[str, list[dict[str, Any]]], dropped: dict[str, int]
) -> bool:
    """Write the index unless a file changed too recently to trust its signature (the same
    racy-timestamp rule as the hash memo). Returns whether it was written.

    Each row names its image relative to ``site_dir`` (``"image"``, as in the manifest): one
    site can be reached by several paths (a study links a held-out site into a copy of the
    federation), and the items must lie under the path it is opened by."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for split, items in splits.items():
        rows[split] = []
        for item in items:
            try:
                signature = stat_signature(site_dir / item["image"])
            except OSError:
                return False
            if not settled(signature):
                return False
            rows[split].append({**item, "stat": signature})
    payload = json.dumps({"splits": rows, "dropped": dropped}).encode()
    with contextlib.suppress(OSError):
        atomic_write_bytes(path, payload)
        return True
    return False


def load_index(
    path: Path, site_dir: Path, cache: PreprocessCache
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, int]] | None:
    """The remembered rows per split, or None when anything they rest on has changed."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        splits = document["splits"]
        dropped = {str(k): int(v) for k, v in document["dropped"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    try:
        for items in splits.values():
            for item in items:
                if stat_signature(site_dir / item["image"]) != item["stat"]:
                    return None
                if not cache.entry_path(str(item["digest"])).is_file():
                    return None
    except (OSError, KeyError, TypeError):
        return None
    return splits, dropped
