"""The federation layout on disk: ``FED_ROOT/federation.json`` names the sites and their roles.

Used by the simulation (every site folder is on this machine) and by the pooled and local
baselines. In deployment no such file is needed on the server: each node's own config names
its site directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

FEDERATION_FILE = "federation.json"
ROLES = ("train", "heldout")


class FederationError(ValueError):
    """An unusable federation.json; the message names the file and the problem."""


@dataclass(frozen=True)
class SiteEntry:
    alias: str
    dir: str
    role: str = "train"


@dataclass(frozen=True)
class Federation:
    root: Path
    task: str
    classes: list[str]
    sites: list[SiteEntry] = field(default_factory=list)

    @property
    def training_sites(self) -> list[SiteEntry]:
        return [s for s in self.sites if s.role == "train"]

    @property
    def heldout_sites(self) -> list[SiteEntry]:
        return [s for s in self.sites if s.role == "heldout"]

    def site_dir(self, alias: str) -> Path:
        for site in self.sites:
            if site.alias == alias:
                return self.root / site.dir
        raise FederationError(f"{self.root / FEDERATION_FILE}: no site named {alias!r}")


def load_federation(root: Path) -> Federation:
    path = Path(root) / FEDERATION_FILE
    if not path.is_file():
        raise FederationError(
            f"{path}: federation file not found (create it with `fedmsk data synth` "
            "or write one listing your site folders)"
        )
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FederationError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from exc
    for key in ("task", "classes", "sites"):
        if key not in content:
            raise FederationError(f"{path}: missing key {key!r}")
    sites = []
    for k, entry in enumerate(content["sites"]):
        if not isinstance(entry, dict) or "alias" not in entry:
            raise FederationError(f"{path}: sites[{k}] needs at least an 'alias'")
        role = entry.get("role", "train")
        if role not in ROLES:
            raise FederationError(
                f"{path}: sites[{k}] role must be 'train' or 'heldout', got {role!r}"
            )
        alias = str(entry["alias"])
        sites.append(SiteEntry(alias=alias, dir=str(entry.get("dir", alias)), role=role))
    if not sites:
        raise FederationError(f"{path}: lists no sites")
    return Federation(
        root=Path(root),
        task=str(content.get("task", "")),
        classes=[str(c) for c in content.get("classes", [])],
        sites=sites,
    )
