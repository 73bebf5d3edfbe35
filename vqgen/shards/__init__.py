"""Stage-2 token shards: the folder format (:mod:`.format`), the resumable per-rank writer (:mod:`.writer`) and the
exact stage-3 token stream (:mod:`.reader`). The names below are the package's public API."""

from .format import (FORMAT, FORMAT_VERSION, MANIFEST_NAME, SPLITS, Manifest, ShardInfo, SplitInfo, has_split,
                     part_path, rank_indices, shard_name, token_dtype)
from .reader import TokenLoader, TokenShardStream, iter_shard, make_token_loader, verify_shards
from .writer import RankShardWriter, check_output, clear_output, merge_manifest

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST_NAME", "SPLITS", "Manifest", "RankShardWriter", "ShardInfo",
           "SplitInfo", "TokenLoader", "TokenShardStream", "check_output", "clear_output", "has_split", "iter_shard",
           "make_token_loader", "merge_manifest", "part_path", "rank_indices", "shard_name", "token_dtype",
           "verify_shards"]
