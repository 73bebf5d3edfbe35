"""Every flag of every script, as typed configs, torch-free (``--help`` never waits for torch).

:mod:`.flags` turns dataclasses into flags and YAML; :mod:`.parts` holds the shared parts, :mod:`.tokenizer` and
:mod:`.prior` the model configs with their registries of kinds, :mod:`.stages` one config per script.
"""

from .datasets import DATASETS, DatasetSpec
from .flags import build_parser, flag, load_config, part, to_dict, to_yaml, validate
from .kinds import Kind, ModelConfig, QuantizerKind
from .parts import (
                    BUILTIN_SAMPLING,
                    CFG_POWER,
                    CFG_SCHEDULES,
                    DISC_LOSSES,
                    DISC_NORMS,
                    LABEL_MODES,
                    PRECISIONS,
                    SPLIT_RE,
                    VGG16_FILE,
                    AugmentConfig,
                    DataConfig,
                    GANConfig,
                    SamplingConfig,
                    ShardingConfig,
                    TokenReaderConfig,
                    TrainConfig,
                    TuneConfig,
                    check_sampling_args,
                    draw_settings,
)
from .prior import (
                    KIND_SAMPLING,
                    MASKGIT_CHOICE_TEMPERATURE,
                    MASKGIT_DECODE_STEPS,
                    PRIOR_ORDERS,
                    PRIORS,
                    PriorConfig,
                    check_kind_sampling,
)
from .stages import (
                    CONFIG_FILE,
                    GRID_SAMPLING,
                    PIPELINE_TRAINING,
                    PRIOR_LR,
                    PRIOR_WARMUP,
                    VQVAE_BATCH,
                    VQVAE_LR,
                    EvalConfig,
                    ExtractConfig,
                    PipelineConfig,
                    PriorStageConfig,
                    SampleConfig,
                    VQVAEStageConfig,
)
from .tokenizer import QUANTIZERS, VQVAEConfig

__all__ = ["BUILTIN_SAMPLING", "CFG_POWER", "CFG_SCHEDULES", "CONFIG_FILE", "DATASETS", "DISC_LOSSES", "DISC_NORMS",
           "GRID_SAMPLING", "KIND_SAMPLING", "LABEL_MODES", "MASKGIT_CHOICE_TEMPERATURE", "MASKGIT_DECODE_STEPS",
           "PIPELINE_TRAINING", "PRECISIONS", "PRIORS", "PRIOR_LR", "PRIOR_ORDERS", "PRIOR_WARMUP", "QUANTIZERS",
           "SPLIT_RE", "VGG16_FILE", "VQVAE_BATCH", "VQVAE_LR", "AugmentConfig", "DataConfig", "DatasetSpec",
           "EvalConfig", "ExtractConfig", "GANConfig", "Kind", "ModelConfig", "PipelineConfig", "PriorConfig",
           "PriorStageConfig", "QuantizerKind", "SampleConfig", "SamplingConfig", "ShardingConfig",
           "TokenReaderConfig", "TrainConfig", "TuneConfig", "VQVAEConfig", "VQVAEStageConfig", "build_parser",
           "check_kind_sampling", "check_sampling_args", "draw_settings", "flag", "load_config", "part", "to_dict",
           "to_yaml", "validate"]
