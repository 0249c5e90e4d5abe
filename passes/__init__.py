"""Graph rewrites, one per module. REGISTRY maps each `--passes` name to its pass classes."""

from planer.passes.channel_pruning import ChannelPruningConfig, ChannelPruningPass
from planer.passes.ffn_to_moe import FfnToMoeConfig, FfnToMoePass
from planer.passes.head_pruning import HeadPruningConfig, HeadPruningPass
from planer.passes.token_skim import TokenSkimConfig, TokenSkimPass

REGISTRY: dict[str, tuple[type, ...]] = {
    "prune": (HeadPruningPass, ChannelPruningPass),
    "moe": (FfnToMoePass,),
    "skim": (TokenSkimPass,),
}

__all__ = [
    "REGISTRY",
    "ChannelPruningConfig",
    "ChannelPruningPass",
    "FfnToMoeConfig",
    "FfnToMoePass",
    "HeadPruningConfig",
    "HeadPruningPass",
    "TokenSkimConfig",
    "TokenSkimPass",
]
