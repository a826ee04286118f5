"""Base models: a registry by name, loading offline, frozen weights."""

from lorafleet.model.registry import (
    DEFAULT_BASE,
    BaseInfo,
    LoadedBase,
    base_digest,
    base_info,
    check_adapter_fits,
    list_bases,
    load_base,
)

__all__ = [
    "DEFAULT_BASE",
    "BaseInfo",
    "LoadedBase",
    "base_digest",
    "base_info",
    "check_adapter_fits",
    "list_bases",
    "load_base",
]
