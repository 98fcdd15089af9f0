"""patronus: an SD-WAN toolkit for Python.

Build a mesh of sites, let patronus enumerate the paths between them, classify
traffic with policies, and move it off failing paths in well under a second.

>>> from patronus import Mesh, Site, Uplink, Policy, Match, QoS
>>> mesh = Mesh("acme")
>>> mesh.add_site(Site("hq", subnets=["10.1.0.0/24"], uplinks=[Uplink("isp1", "192.0.2.1"), Uplink("lte", "198.51.100.7")]))
>>> mesh.add_site(Site("br1", subnets=["10.2.0.0/24"], uplinks=[Uplink("isp1", "203.0.113.9")]))
>>> len(mesh.paths("hq", "br1"))
2

``save_mesh(mesh, path)`` writes it into a SQLite state file and
``load_mesh(path)`` reads it back (``patronus.store``).

Importing patronus is cheap and needs neither root nor BCC: heavier parts
(numpy, the compiled classifier, the XDP backend) load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .apps import AppProfile
from .errors import ConfigError, DataplaneUnavailable, PatronusError, SchemaVersionError, StateError
from .mesh import Mesh
from .model import Failover, Match, Path, Policy, QoS, Site, Uplink

__version__ = "0.1.0"

__all__ = [
    "Mesh", "Site", "Uplink", "Path", "Policy", "Match", "QoS", "Failover", "AppProfile",
    "PolicyTable", "flows_to_pandas", "save_mesh", "load_mesh",
    "ConfigError", "StateError", "SchemaVersionError", "DataplaneUnavailable", "PatronusError",
]

if TYPE_CHECKING:
    from .policy import PolicyTable, flows_to_pandas
    from .store import load_mesh, save_mesh

# name -> module that defines it; imported on first attribute access
_LAZY = {"PolicyTable": "policy", "flows_to_pandas": "policy", "save_mesh": "store", "load_mesh": "store",
         "dataplane": None, "paths": None, "lab": None}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        mod = _LAZY[name]
        if mod is None:
            return importlib.import_module(f".{name}", __name__)
        return getattr(importlib.import_module(f".{mod}", __name__), name)
    raise AttributeError(f"module 'patronus' has no attribute {name!r}")
