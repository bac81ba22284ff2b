"""The provider registry: every dialect relay speaks, by the `kind` name used in configuration.

One module per dialect; each owns its request mapping and response parsing. `base`
holds the interface, capability data and the shared error mapping.
"""

from __future__ import annotations

from typing import Any

import httpx

from relay.providers.apimart import ApiMartProvider
from relay.providers.base import Capabilities, Provider, check_supported
from relay.providers.evolink import EvoLinkProvider
from relay.providers.gmicloud import GmiCloudProvider
from relay.providers.openai import OpenAIProvider
from relay.providers.pixazo import PixazoProvider

PROVIDER_KINDS: dict[str, type[Provider]] = {
    cls.kind: cls
    for cls in (GmiCloudProvider, ApiMartProvider, EvoLinkProvider, PixazoProvider, OpenAIProvider)
}


def build_provider(kind: str, http: httpx.AsyncClient, **kwargs: Any) -> Provider:
    """Instantiate the adapter for `kind` with `Provider.__init__` kwargs. Unknown kinds raise ValueError."""
    try:
        cls = PROVIDER_KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown provider kind {kind!r}; known: {', '.join(sorted(PROVIDER_KINDS))}") from None
    return cls(http, **kwargs)


__all__ = [
    "PROVIDER_KINDS", "ApiMartProvider", "Capabilities", "EvoLinkProvider", "GmiCloudProvider",
    "OpenAIProvider", "PixazoProvider", "Provider", "build_provider", "check_supported",
]
