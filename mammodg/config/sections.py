"""The configuration dataclasses: the builder's, and the training config's shared fields with one section per
stage or model. Each default lives here once; CLI flags never repeat it. Choice fields are ``Literal`` types."""
from __future__ import annotations

import dataclasses
from typing import Literal

from mammodg.config.loading import ConfigError

Strategy = Literal["periodic", "balanced_segments", "balanced_labels", "natural"]
VoiPolicy = Literal["auto", "none", "always"]
ContrastiveMethod = Literal["simclr", "mscl", "mvcl", "msvcl"]
ContrastiveOptimizer = Literal["sgd", "adamw"]
PatientKey = Literal["source_and_id", "patient_id"]
ContrastiveBackbone = Literal["resnet50", "resnet18"]
Precision = Literal["float32", "mixed_bfloat16", "mixed_float16"]


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
    overlap_shift: float = 1.0  # ... their centres within +/- shift/2 crop sides of it (1: anywhere it stays inside)
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

