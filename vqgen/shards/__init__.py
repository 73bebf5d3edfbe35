"""Stage-2 token shards: the folder format (:mod:`.format`), the resumable per-rank writer (:mod:`.writer`) and the
stage-3 token reader (:mod:`.reader`: who reads what in :mod:`.plan`, reads by offset in :mod:`.access`). The
names below are the package's public API."""

from .format import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    SPLITS,
    Manifest,
    ShardInfo,
    SplitInfo,
    has_split,
    part_path,
    rank_indices,
    sample_shape,
    shard_name,
    token_dtype,
)
from .plan import PlanSpec, ResumePoint, plan_epoch, resume_history
from .reader import VERIFY_MODES, TokenLoader, TokenSplit, TokenStream, check_split, make_token_loader
from .writer import RankShardWriter, check_output, clear_output, merge_manifest

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST_NAME", "SPLITS", "VERIFY_MODES", "Manifest", "PlanSpec",
           "RankShardWriter", "ResumePoint", "ShardInfo", "SplitInfo", "TokenLoader", "TokenSplit", "TokenStream",
           "check_output", "check_split", "clear_output", "has_split", "make_token_loader", "merge_manifest",
           "part_path", "plan_epoch", "rank_indices", "resume_history", "sample_shape", "shard_name",
           "token_dtype"]
