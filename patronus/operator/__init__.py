"""The Kubernetes operator: ``Site`` and ``Policy`` custom resources
(``sdwan.patronus.dev/v1``) reconciled against a controller through
:mod:`patronus.client`.

The resource's ``spec`` is the library model's own dictionary form
(``Site.to_dict()`` / ``Policy.to_dict()`` without ``name``); the name on
the controller is ``metadata.name``. kopf is imported only by
:mod:`patronus.operator.run` (``patronus operator``), so this package and
the CRD generator (``patronus crdgen``) work without it.

>>> GROUP, VERSION
('sdwan.patronus.dev', 'v1')
>>> KINDS["Policy"].plural
'policies'
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GROUP", "VERSION", "API_VERSION", "Kind", "KINDS", "ANNOTATION_PREFIX"]

GROUP = "sdwan.patronus.dev"
VERSION = "v1"
API_VERSION = f"{GROUP}/{VERSION}"
ANNOTATION_PREFIX = GROUP   # kopf's progress and last-handled state live in annotations under it


@dataclass(frozen=True)
class Kind:
    """One custom resource kind: its names in the Kubernetes API."""

    kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...]


KINDS = {
    "Site": Kind("Site", "sites", "site", ("psite",)),
    "Policy": Kind("Policy", "policies", "policy", ("ppolicy",)),
}
