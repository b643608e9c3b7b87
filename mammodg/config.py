"""Typed configuration: dataclasses loaded from YAML, unknown keys rejected, ``--set a.b=c`` overrides.

Each stage's defaults live here once; CLI flags never repeat them. Choice fields are ``Literal`` types:
the allowed values are checked at load and named in the error. The shipped configs (``configs/``) are
package data, found by name (``demo/contrastive.yaml``) through :func:`config_path`.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

MAX_CONFIG_BYTES = 1 << 20  # a config file is a few kB; anything over 1 MiB is refused
MAX_CONFIG_NODES = 100_000  # values after YAML alias expansion (an alias bomb expands to billions)

Strategy = Literal["periodic", "balanced_segments", "balanced_labels", "natural"]
VoiPolicy = Literal["auto", "none", "always"]
ContrastiveMethod = Literal["simclr", "mscl", "mvcl", "msvcl"]
ContrastiveOptimizer = Literal["sgd", "adamw"]
PatientKey = Literal["source_and_id", "patient_id"]
ContrastiveBackbone = Literal["resnet50", "resnet18"]
Precision = Literal["float32", "mixed_bfloat16", "mixed_float16"]


class ConfigError(ValueError):
    """A configuration field is missing, unknown or of the wrong type; the message names it."""


@dataclasses.dataclass
class PreprocessConfig:
    """Image standardisation, periodic-sampling paper section 3.1.1 (and MSVCL v2 section IV-A)."""

    height: int = 1152
    width: int = 832
    # When set (e.g. 0.1), images are resampled to this pixel spacing instead of to ``height`` rows,
    # then cropped/padded to (height, width) (MSVCL v2, section IV-A).
    target_spacing_mm: float | None = None
    # VOI policy, see mammodg.io.dicom: "auto" | "none" | "always".
    voi: VoiPolicy = "auto"
    # Mean pixel value every model input image gets (pixels outside the breast take the constant
    # that produces it). Applied when records are decoded, see mammodg.records.schema.
    target_mean: float = 0.25


@dataclasses.dataclass
class BuildConfig:
    """TFRecord builder: ``mammodg build-tfrecords``."""

    preprocess: PreprocessConfig = dataclasses.field(default_factory=PreprocessConfig)
    # Manifest columns whose combination defines a data segment.
    segment_keys: list[str] = dataclasses.field(default_factory=lambda: ["source", "manufacturer"])
    val_fraction: float = 0.2
    seed: int = 0
    # Salt of the patient pseudonyms. Empty: a random salt is created once and kept in
    # ``<out>/.pseudonym_salt`` (never inside records), so re-runs give the same pseudonyms.
    pseudonym_salt: str = ""
    # How rows are grouped into patients: "source_and_id" (default) keys a patient by (source, patient_id), so
    # one person listed in two sources counts as two patients (possibly in both splits); "patient_id" keys by
    # the id alone, for manifests whose ids are shared across sources (one pseudonym, one split).
    patient_key: PatientKey = "source_and_id"
    workers: int = 0  # 0 = all cores
    shard_size: int = 256  # records per shard file at most
    allow_non_mg: bool = False  # accept modalities other than MG
    png_compress_level: int = 1  # zlib level of the 16-bit PNGs (0-9): speed vs size
    keep_cache: bool = False  # keep the per-image cache used for resuming after success
    reject_burned_in: bool = False  # reject images whose BurnedInAnnotation is YES (else: kept and reported)


def _field_type(cls, name):
    return typing.get_type_hints(cls)[name]


def _coerce(value: Any, tp, where: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: must be one of {list(args)}, got {_short(value)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0] if args else Any, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1] if args else Any, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is str and value is None:  # `--set key=` (empty YAML value) clears a string field
        return ""
    if tp in (int, float, str):
        if isinstance(value, (list, tuple, dict)):  # never str() a (possibly alias-expanded) structure
            raise ConfigError(f"{where}: expected {tp.__name__}, got a {type(value).__name__}")
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {_short(value)}") from None
    return value


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _check_size(data, where: str) -> None:
    """Refuse a structure with more than MAX_CONFIG_NODES values (counted without expanding it all)."""
    stack, seen = [data], 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_CONFIG_NODES:
            raise ConfigError(f"{where}: more than {MAX_CONFIG_NODES} values (a YAML alias bomb?); refused")
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)


def from_dict(cls, data: dict, where: str = "config"):
    """Build dataclass ``cls`` from a mapping; unknown keys raise ConfigError naming them."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(names)}")
    kwargs = {k: _coerce(v, _field_type(cls, k), f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Apply ``a.b=c`` strings (values parsed as YAML scalars) to a nested mapping."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. preprocess.height=256")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p} is not a section")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: not a valid YAML value ({str(e).splitlines()[0]})") from None
        _check_size(value, f"--set {key}")
        node[parts[-1]] = value
    return data


def shipped_configs():
    """The folder of the configs shipped with the package (``demo/``, ``msvcl/``, ``periodic_sampling/``)."""
    return importlib.resources.files("mammodg") / "configs"


def config_path(name: str | Path):
    """A config file by path, or else by its name among the shipped configs (``demo/contrastive.yaml``,
    also written ``configs/demo/contrastive.yaml``). A missing file is a ConfigError, never a default."""
    path = Path(name)
    if path.is_file():
        return path
    parts = path.parts[1:] if path.parts[:1] == ("configs",) else path.parts
    if parts and not path.is_absolute():
        shipped = shipped_configs().joinpath(*parts)
        if shipped.is_file():
            return shipped
    raise ConfigError(f"config file not found: {name} (neither a file nor a shipped config; shipped: "
                      f"{', '.join(list_shipped_configs())})")


def list_shipped_configs() -> list[str]:
    return sorted(f"{d.name}/{f.name}" for d in shipped_configs().iterdir() if d.is_dir()
                  for f in d.iterdir() if f.name.endswith(".yaml"))


def default_config(stage: str):
    """The embedded default of ``mammodg train --stage S``: the shipped ``demo/<stage>.yaml``."""
    return config_path(f"demo/{stage}.yaml")


def load(cls, path: str | Path | None = None, overrides: list[str] | None = None):
    """Load dataclass ``cls`` from an optional YAML file (a path or a shipped config name) plus overrides."""
    data: dict = {}
    where = "config"
    if path is not None:
        path = config_path(path)
        raw = path.read_bytes()
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {len(raw)} bytes, over the {MAX_CONFIG_BYTES}-byte limit for a config file")
        try:
            data = yaml.safe_load(raw.decode("utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 (byte {e.start})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        where = str(path)
        _check_size(data, where)
    data = apply_overrides(data, overrides)
    return from_dict(cls, data, where)


def save(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


@dataclasses.dataclass
class VGGConfig:
    """The VGG-like backbone of the periodic-sampling paper (appendix A.2), shared by ``patch`` and ``classifier``."""

    width: float = 1.0  # width multiplier of every block (small for tests and demos)
    filters: list[int] = dataclasses.field(default_factory=lambda: [32, 64, 128, 256, 256, 512])


@dataclasses.dataclass
class AugmentConfig:
    """Training augmentation of the patch and classifier stages (periodic-sampling paper, section 3.1.1 and
    appendix A.3.1): one random affine transform per sample (``mammodg.augment.geometry``), lesion boxes
    moved with the image. Never applied to validation."""

    enabled: bool = True  # false: no augmentation
    flip_h: float = 0.5  # probability of a horizontal flip
    flip_v: float = 0.5  # probability of a vertical flip
    rotation_deg: float = 20.0  # uniform in [-r, r]
    zoom: list[float] = dataclasses.field(default_factory=lambda: [0.9, 1.1])  # (low, high), > 1 enlarges
    shear_deg: float = 10.0  # uniform in [-s, s]

    def __post_init__(self):
        if len(self.zoom) != 2 or not 0 < self.zoom[0] <= self.zoom[1]:
            raise ConfigError(f"augment.zoom: expected [low, high] with 0 < low <= high, got {self.zoom}")
        if not (0 <= self.flip_h <= 1 and 0 <= self.flip_v <= 1):
            raise ConfigError("augment.flip_h / flip_v: probabilities in [0, 1]")
        if not (0 <= self.shear_deg < 45 and self.rotation_deg >= 0):
            raise ConfigError("augment.shear_deg must be in [0, 45) and rotation_deg >= 0 (degrees)")


@dataclasses.dataclass
class PatchConfig:
    """``--stage patch`` (periodic-sampling paper, appendix A.3): lesion / healthy-tissue patch pre-training."""

    patch_size: int = 224  # crop size around lesions and healthy tissue
    jitter: float = 0.25  # training lesion patches are off-centre by up to jitter * patch_size per axis
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)


@dataclasses.dataclass
class ClassifierConfig:
    """``--stage classifier`` (periodic-sampling paper, section 3.1.2): full-image fine-tuning."""

    init_from: str = ""  # run folder of a patch run: its best backbone weights (architecture from its config.yaml)
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)


@dataclasses.dataclass
class CycleGANConfig:
    """``--stage cyclegan`` (MSVCL v2 section III-B1 / IV-B): one CycleGAN per pair of seen styles."""

    # Seen vendor styles: data segments of the dataset (e.g. "Phantom|VendorA"); empty = every
    # segment of the train split. C(M, 2) pairs are trained.
    styles: list[str] = dataclasses.field(default_factory=list)
    crop_size: int = 512  # random training crops (paper: 512x512)
    generator_filters: int = 64
    generator_blocks: int = 9  # ResNet generator residual blocks (paper: 9)
    discriminator_filters: int = 64
    cycle_weight: float = 10.0  # lambda of the L1 cycle loss
    identity_weight: float = 0.5  # identity loss weight, as a fraction of cycle_weight (0 = off)
    pool_size: int = 50  # image pool of past fakes shown to the discriminators
    beta_1: float = 0.5
    decay_start: float = 0.5  # fraction of steps after which the learning rate decays linearly to 0


@dataclasses.dataclass
class ContrastiveConfig:
    """``--stage contrastive`` (MSVCL v2 sections III-A/B, IV-B)."""

    method: ContrastiveMethod = "msvcl"
    pairs_dir: str = ""  # breast-level pair records (mammodg build-pairs); default <run_dir>/../pairs
    cyclegan_run: str = ""  # run folder of a cyclegan stage: styles are rendered with its generators
    cyclegan_config: str = ""  # config to train ``cyclegan_run`` first when it does not exist yet (demo)
    pair_size: list[int] = dataclasses.field(default_factory=list)  # (h, w) of images in pair records; [] = as built
    input_size: list[int] = dataclasses.field(default_factory=lambda: [512, 384])  # (h, w) of the crops fed to the encoder
    temperature: float = 0.1
    projection_dim: int = 128
    hidden_dim: int = 2048
    optimizer: ContrastiveOptimizer = "sgd"  # sgd: SimCLR scaling, peak learning_rate * batch / 256; adamw: peak learning_rate
    weight_decay: float = 1e-6
    warmup_steps: int = 0
    crop_scale: list[float] = dataclasses.field(default_factory=lambda: [0.6, 1.0])  # crop area fraction range
    view_crop_scale: list[float] = dataclasses.field(default_factory=list)  # multi-view sides' crop area range; [] = crop_scale
    crop_overlap: bool = True  # crops of the same view of a sample contain a common breast point (small crops)
    rotation_deg: float = 10.0
    jitter: float = 0.2  # colour (intensity) jitter strength
    weights: str = ""  # optional local .h5/.weights.h5 of ImageNet ResNet-50 weights (never downloaded)
    backbone: ContrastiveBackbone = "resnet50"  # or "resnet18": a compact residual encoder of width x 64 base filters (demo)
    width: float = 1.0  # resnet18 only: width multiplier of its filters
    val_breasts: int = 32  # validation batch: at least this many breasts (all of them if fewer)


@dataclasses.dataclass
class DownstreamConfig:
    """Shared fields of the classification downstream stages (MSVCL v2 section IV-B): SGD with momentum and
    weight decay on a ResNet-50 initialised from a contrastive run."""

    backbone_from: str = ""  # a contrastive run folder (its backbone.weights.h5); "" = random initialisation
    backbone: Literal["resnet50", "tiny"] = "resnet50"  # tiny: a few convolutions, for tests and demos only
    momentum: float = 0.9
    weight_decay: float = 1e-5  # Keras SGD's decoupled decay (lr x weight_decay x w per step)
    flip: bool = True  # random horizontal and vertical flips
    scale_range: list[float] = dataclasses.field(default_factory=lambda: [0.9, 1.1])  # random zoom about the centre


@dataclasses.dataclass
class BiradsConfig(DownstreamConfig):
    """``--stage birads``: 5 BI-RADS classes (2-3, 4A, 4B, 4C, 5) of lesion ROI crops."""

    crop_size: int = 224
    enlarge: float = 0.2  # the square crop's side is (1 + enlarge) x the box's long side
    masses_only: bool = True  # only boxes whose lesion class names a mass (the paper rates masses)


@dataclasses.dataclass
class DensityConfig(DownstreamConfig):
    """``--stage density``: non-dense (A/B) vs dense (C/D) on whole images; trained on breast pair records."""

    pairs_dir: str = ""  # breast pair records (mammodg build-pairs); default <run_dir>/../pairs
    input_size: list[int] = dataclasses.field(default_factory=lambda: [224, 224])


@dataclasses.dataclass
class DetectionConfig:
    """``--stage detection``: FCOS mass detection (MSVCL v2 sections III-C, IV-B; README "Detection")."""

    input_size: list[int] = dataclasses.field(default_factory=lambda: [1152, 832])  # (h, w) the stored image is resized to
    levels: list[int] = dataclasses.field(default_factory=lambda: [3, 4, 5, 6, 7])  # [2, 3, ..., 7]: P2 on (small masses)
    backbone: Literal["resnet50", "tiny"] = "resnet50"  # tiny: a few convolutions, tests and quick demos
    backbone_from: str = ""  # run folder of a contrastive run: its backbone.weights.h5
    weights: str = ""  # or a local ImageNet ResNet-50 weights file (never downloaded); neither: random
    backbone_width: int = 8  # channels of the tiny backbone
    width: int = 256  # FPN and head channels
    tower_convs: int = 4
    groups: int = 32  # GroupNorm groups of the head towers (divides width)
    # detected lesion classes; merge_classes: all of them are one class "mass" (the paper detects masses)
    lesion_classes: list[str] = dataclasses.field(default_factory=lambda: ["benign_mass", "malignant_mass"])
    merge_classes: bool = True
    max_boxes: int = 32  # box slots per image (more lesions than this in one image are cut)
    flip: float = 0.5  # horizontal flip probability (training only)
    scale: list[float] = dataclasses.field(default_factory=lambda: [0.8, 1.25])  # random scale range (training only)
    momentum: float = 0.9  # SGD (section IV-B)
    weight_decay: float = 1.0e-4
    score_threshold: float = 0.05
    iou_threshold: float = 0.6  # class-wise NMS
    max_detections: int = 100

    def class_names(self) -> list[str]:
        return ["mass"] if self.merge_classes else list(self.lesion_classes)

    def model_kwargs(self) -> dict:
        """Keyword arguments of the ``fcos`` model builder (:func:`mammodg.models.fcos.fcos_model`)."""
        return {"input_shape": (*self.input_size, 1), "num_classes": len(self.class_names()),
                "levels": tuple(self.levels), "backbone": self.backbone, "width": self.width,
                "tower_convs": self.tower_convs, "groups": self.groups, "backbone_width": self.backbone_width}


@dataclasses.dataclass
class MatchingConfig:
    """``--stage matching``: CC/MLO mass matching (MSVCL v2 sections III-C-2, IV-B; README "Mass matching")."""

    detection_run: str = ""  # run folder of a detection run: candidates are its detections; "": stand-in candidates
    standin_false_positives: int = 2  # stand-in: false-positive boxes drawn on breast tissue per image
    max_candidates: int = 8  # detections per image kept as candidates (highest scores)
    lesion_classes: list[str] = dataclasses.field(default_factory=lambda: ["benign_mass", "malignant_mass"])
    iou_threshold: float = 0.5  # a candidate is a TP of a ground truth at this IoU
    roi_size: int = 224  # ROI crops (squares of the long side enlarged by ``enlarge``) are resized to this
    enlarge: float = 0.2
    flip: float = 0.5  # probability of flipping both crops of a training pair left-right together
    backbone: Literal["resnet50", "tiny"] = "resnet50"  # tiny: a few convolutions, tests and quick demos
    backbone_from: str = ""  # run folder of a contrastive run: its backbone.weights.h5 ("": random)
    backbone_width: int = 8  # channels of the tiny backbone
    hidden_dim: int = 256
    embedding_dim: int = 128
    margin: float = 10.0  # m of eq. (3); a pair matches when D < m / 2 (match_score > 0.5)
    momentum: float = 0.9  # SGD (section IV-B)
    weight_decay: float = 1.0e-5
    clipnorm: float = 0.0  # > 0: clip the global gradient norm (eq. (3) is unbounded; not in the paper)
    rescore_boost: float = 0.5  # evaluate: score += boost * match_score * (1 - score) on a strong match


@dataclasses.dataclass
class TrainConfig:
    """A training stage (``mammodg train --stage S``); paper defaults in configs/periodic_sampling/."""

    stage: str = "classifier"
    data_dir: str = "demo_run/tfrecords"
    run_dir: str = ""  # default: runs/<stage>
    train_split: str = "train"
    val_split: str = "val"
    strategy: Strategy = "periodic"
    batch_size: int = 24
    steps: int = 150000
    val_every: int = 1000
    learning_rate: float = 1e-4
    ema_momentum: float = 0.99
    seed: int = 0
    target_mean: float = 0.25  # must match the dataset's preprocess.target_mean
    shuffle_budget: int = 512  # serialized records held in all stream shuffle buffers together
    val_max_batches: int = 0  # 0 = the whole validation split
    export: bool = True  # write a SavedModel of the best EMA weights at the end
    # Keras dtype policy of the model (losses stay float32); mixed_float16 adds loss scaling
    mixed_precision: Precision = "float32"
    jit_compile: bool = False  # XLA-compile the training step
    vgg: VGGConfig = dataclasses.field(default_factory=VGGConfig)  # patch and classifier backbone
    patch: PatchConfig = dataclasses.field(default_factory=PatchConfig)
    classifier: ClassifierConfig = dataclasses.field(default_factory=ClassifierConfig)
    cyclegan: CycleGANConfig = dataclasses.field(default_factory=CycleGANConfig)
    contrastive: ContrastiveConfig = dataclasses.field(default_factory=ContrastiveConfig)
    # share of the labelled training patients the downstream stages (detection, matching, birads, density)
    # train on, in (0, 1]: deterministic patient-level subsampling (mammodg.sampling.label_fraction)
    label_fraction: float = 1.0
    birads: BiradsConfig = dataclasses.field(default_factory=BiradsConfig)
    density: DensityConfig = dataclasses.field(default_factory=DensityConfig)
    detection: DetectionConfig = dataclasses.field(default_factory=DetectionConfig)
    matching: MatchingConfig = dataclasses.field(default_factory=MatchingConfig)

    def resolved_run_dir(self) -> str:
        return self.run_dir or f"runs/{self.stage}"
