"""Graph rewrites, one per module. The registry maps `--passes` names to pass classes."""

from planer.passes.channel_pruning import ChannelPruningConfig, ChannelPruningPass
from planer.passes.head_pruning import HeadPruningConfig, HeadPruningPass

REGISTRY = {
    "heads": HeadPruningPass,
    "channels": ChannelPruningPass,
}

__all__ = [
    "REGISTRY",
    "ChannelPruningConfig",
    "ChannelPruningPass",
    "HeadPruningConfig",
    "HeadPruningPass",
]
