"""Policy compiler: a list of Policy -> a rule table the data planes run.

>>> from patronus import PolicyTable, Policy, Match
>>> table = PolicyTable([Policy("web", Match(proto="tcp", dst_ports=443), priority=20),
...                      Policy("dns", Match(proto="udp", dst_ports=53), priority=10)])
>>> [p.name for p in table.by_priority]
['dns', 'web']
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from . import reference
from .errors import ConfigError
from .model import Policy

__all__ = ["PolicyTable", "flows_to_pandas"]


class PolicyTable:
    """Policies compiled for classification.

    ``policies`` keeps the order the list was given in; classification
    returns indexes into it (-1: no policy matched).
    """

    def __init__(self, policies: Iterable[Policy]) -> None:
        pols = list(policies)
        names: dict[str, int] = {}
        prios: dict[int, str] = {}
        for p in pols:
            if not isinstance(p, Policy):
                raise ConfigError("PolicyTable.policies", p, "is not a Policy")
            if p.name in names:
                raise ConfigError("Policy.name", p.name, "is a duplicate policy name")
            if p.priority in prios:
                raise ConfigError("Policy.priority", p.priority, f"is already used by policy {prios[p.priority]!r}")
            names[p.name] = len(names)
            prios[p.priority] = p.name
        self.policies: tuple[Policy, ...] = tuple(pols)
        self._index = names

    @property
    def by_priority(self) -> list[Policy]:
        return sorted(self.policies, key=lambda p: p.priority)

    def index(self, name: str) -> int:
        """Index of the policy called ``name``."""
        try:
            return self._index[name]
        except KeyError:
            raise ConfigError("policy", name, "is not in this table") from None

    def classify(self, frames: Sequence[bytes]) -> np.ndarray:
        """Policy index per frame (int32, -1 = no match)."""
        return np.array([reference.classify(self.policies, f) for f in frames], dtype=np.int32)

    def __len__(self) -> int:
        return len(self.policies)

    def __repr__(self) -> str:
        return f"PolicyTable({len(self.policies)} policies)"


def flows_to_pandas(flows: np.ndarray) -> Any:
    """A pandas DataFrame of a flows array with readable addresses (needs pandas)."""
    raise NotImplementedError
