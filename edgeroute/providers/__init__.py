"""Provider adapters: one per upstream API family, chosen by `kind` in the config."""

from __future__ import annotations

from edgeroute.config import ProviderConfig
from edgeroute.providers.anthropic import AnthropicAdapter
from edgeroute.providers.base import (
    ErrorClass,
    ProviderAdapter,
    UpstreamError,
    UpstreamReply,
    UpstreamRequest,
    UpstreamStream,
    Usage,
)
from edgeroute.providers.http1 import UpstreamClient
from edgeroute.providers.openai import AzureAdapter, OpenAIAdapter

_ADAPTERS: dict[str, type[OpenAIAdapter] | type[AnthropicAdapter]] = {
    "openai": OpenAIAdapter,
    "azure": AzureAdapter,
    "anthropic": AnthropicAdapter,
}


def make_adapter(config: ProviderConfig, session: UpstreamClient) -> ProviderAdapter:
    return _ADAPTERS[config.kind](config, session)


__all__ = [
    "ErrorClass",
    "ProviderAdapter",
    "UpstreamError",
    "UpstreamReply",
    "UpstreamRequest",
    "UpstreamStream",
    "Usage",
    "make_adapter",
]
