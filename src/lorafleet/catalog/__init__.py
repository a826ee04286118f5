"""The adapter catalog: policies, immutable revisions, aliases, evaluations, lineage, tenants.

`Catalog` (service.py) is the API; records.py holds what it returns.
"""

from lorafleet.catalog.records import ADMIN, Principal, Provenance, RevisionKind
from lorafleet.catalog.service import Catalog

__all__ = ["ADMIN", "Catalog", "Principal", "Provenance", "RevisionKind"]
