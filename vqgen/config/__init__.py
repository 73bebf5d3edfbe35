"""Every flag of every script, as typed configs, torch-free (``--help`` never waits for torch).

:mod:`.flags` turns dataclasses into flags and YAML; :mod:`.parts` holds the shared parts, :mod:`.tokenizer` and
:mod:`.prior` the model configs with their registries of kinds, :mod:`.stages` one config per script.
"""

from .datasets import DATASETS, DatasetSpec
from .flags import build_parser, flag, load_config, part, to_dict, to_yaml, validate
from .kinds import Kind, ModelConfig, QuantizerKind
from .parts import (CFG_POWER, CFG_SCHEDULES, LABEL_MODES, DISC_LOSSES, DISC_NORMS, PRECISIONS, SPLIT_RE, VGG16_FILE, AugmentConfig, DataConfig, GANConfig, SamplingConfig,
                    ShardingConfig, TokenReaderConfig, TrainConfig, check_sampling_args)
from .prior import (KIND_SAMPLING, MASKGIT_CHOICE_TEMPERATURE, MASKGIT_DECODE_STEPS, PRIOR_ORDERS, PRIORS, PriorConfig,
                    check_kind_sampling)
from .stages import (CONFIG_FILE, GRID_SAMPLING, PIPELINE_TRAINING, PRIOR_LR, VQVAE_BATCH, VQVAE_LR, EvalConfig,
                     ExtractConfig, PipelineConfig, PriorStageConfig, SampleConfig, VQVAEStageConfig)
from .tokenizer import QUANTIZERS, VQVAEConfig

__all__ = ["CFG_POWER", "CFG_SCHEDULES", "LABEL_MODES", "KIND_SAMPLING", "MASKGIT_CHOICE_TEMPERATURE", "MASKGIT_DECODE_STEPS",
           "PRIOR_ORDERS", "check_kind_sampling", "CONFIG_FILE", "DISC_LOSSES", "DISC_NORMS", "VGG16_FILE", "DATASETS", "GRID_SAMPLING", "PIPELINE_TRAINING", "PRECISIONS", "PRIORS",
           "PRIOR_LR", "QUANTIZERS", "SPLIT_RE", "VQVAE_BATCH", "VQVAE_LR", "AugmentConfig", "DataConfig",
           "DatasetSpec", "EvalConfig", "ExtractConfig", "GANConfig", "Kind", "ModelConfig", "PipelineConfig",
           "PriorConfig", "PriorStageConfig", "QuantizerKind", "SampleConfig", "SamplingConfig", "ShardingConfig",
           "TokenReaderConfig", "TrainConfig", "VQVAEConfig", "VQVAEStageConfig", "build_parser",
           "check_sampling_args", "flag", "load_config", "part", "to_dict", "to_yaml", "validate"]
