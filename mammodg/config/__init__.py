"""Typed configuration: dataclasses loaded from YAML, unknown keys rejected, ``--set a.b=c`` overrides.

Each stage's defaults live in :mod:`mammodg.config.sections` once; CLI flags never repeat them. Choice fields
are ``Literal`` types: the allowed values are checked at load and named in the error
(:mod:`mammodg.config.loading`). The shipped configs (``configs/``) are package data, found by name
(``demo/contrastive.yaml``) through :func:`config_path`.
"""
from mammodg.config.loading import (MAX_CONFIG_BYTES, MAX_CONFIG_NODES, ConfigError, apply_overrides, config_path,
                                    default_config, from_dict, list_shipped_configs, load, save, shipped_configs,
                                    to_dict)
from mammodg.config.sections import (AugmentConfig, BiradsConfig, BuildConfig, ClassifierConfig, ContrastiveBackbone,
                                     ContrastiveConfig, ContrastiveMethod, ContrastiveOptimizer, CycleGANConfig,
                                     DensityConfig, DetectionConfig, DownstreamConfig, MatchingConfig, PatchConfig,
                                     PatientKey, Precision, PreprocessConfig, Strategy, TrainConfig, VGGConfig,
                                     VoiPolicy)

__all__ = ["MAX_CONFIG_BYTES", "MAX_CONFIG_NODES", "ConfigError", "apply_overrides", "config_path", "default_config",
           "from_dict", "list_shipped_configs", "load", "save", "shipped_configs", "to_dict", "AugmentConfig",
           "BiradsConfig", "BuildConfig", "ClassifierConfig", "ContrastiveBackbone", "ContrastiveConfig",
           "ContrastiveMethod", "ContrastiveOptimizer", "CycleGANConfig", "DensityConfig", "DetectionConfig",
           "DownstreamConfig", "MatchingConfig", "PatchConfig", "PatientKey", "Precision", "PreprocessConfig",
           "Strategy", "TrainConfig", "VGGConfig", "VoiPolicy"]
