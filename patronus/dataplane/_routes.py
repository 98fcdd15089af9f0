"""(class, destination site) -> path moves, checked once for every backend."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .. import abi
from ..errors import ConfigError

# routes per table: (policies + 1) x (sites + 1); the XDP program keeps two
# sets of them (8 bytes each: 1 GiB at the cap), userspace one (4 bytes each)
MAX_ROUTES = 1 << 26


def check_routes(field: str, npolicies: int, nsites: int) -> None:
    """Refuse a table whose route table would pass MAX_ROUTES, by name."""
    n = (npolicies + 1) * (nsites + 1)
    if n > MAX_ROUTES:
        raise ConfigError(field, f"{npolicies} policies x {nsites} sites",
                          f"need {n:,} routes ((policies + 1) x (sites + 1)), more than the {MAX_ROUTES:,} "
                          "a data plane takes")


def class_id(table: Any, policy: str | int | None) -> int:
    """-1 for the default class (None or -1), else the policy's id."""
    if policy is None:
        return -1
    if isinstance(policy, str):
        return table.index(policy)
    if isinstance(policy, bool) or not isinstance(policy, int) or not -1 <= policy < len(table.policies):
        raise ConfigError("policy", policy, f"is not a policy name, None/-1 (default) or an id 0..{len(table.policies) - 1}")
    return policy


def resolve_moves(table: Any, moves: Iterable[tuple[Any, Any, Any]]) -> list[tuple[int, list[int], int]]:
    """Check every (class, site, path) and return (class id, site columns,
    path slot) for each: site None means every column, path None no path."""
    out = []
    for move in moves:
        if not isinstance(move, tuple) or len(move) != 3:
            raise ConfigError("move", move, "is not a (policy, site, path) tuple")
        policy, site, path = move
        cls = class_id(table, policy)
        cols = list(range(len(table.sites) + 1)) if site is None else [table.site_id(site)]
        if path is None:
            slot = abi.NO_PATH
        elif isinstance(path, bool) or not isinstance(path, int) or not 0 <= path < abi.NO_PATH:
            raise ConfigError("path_id", path, "is not a path slot (0 .. 2**32-2) or None")
        else:
            slot = path
        out.append((cls, cols, slot))
    return out


def remap_routes(routes: Any, old_sites: tuple[str, ...], new_sites: tuple[str, ...], ncols: int | None = None) -> Any:
    """A route table (class x site column) for a table with ``new_sites``:
    column 0 (outside every site) and the columns of sites kept by name keep
    their paths, new sites start with no path. ``ncols`` pads to a width
    (the XDP program's compiled-in columns)."""
    import numpy as np

    out = np.full((routes.shape[0], ncols or len(new_sites) + 1), abi.NO_PATH, dtype=routes.dtype) \
        if routes.dtype.names is None else np.zeros((routes.shape[0], ncols or len(new_sites) + 1), dtype=routes.dtype)
    if routes.dtype.names is not None:
        out["path"] = abi.NO_PATH
        out["action"] = routes["action"][:, :1]
    out[:, 0] = routes[:, 0]
    for j, name in enumerate(new_sites):
        if name in old_sites:
            out[:, j + 1] = routes[:, old_sites.index(name) + 1]
    return out
