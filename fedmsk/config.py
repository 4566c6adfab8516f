"""Typed experiment configuration, composed by Hydra from ``configs/``.

Hydra is the single source of configuration. The dataclasses below are the schema: every
group file in ``configs/`` is validated against them, so a typo in an override fails at
composition time with the name of the setting, instead of deep inside a federated round.

Flower never sees these objects. What crosses to a Flower app is the list of Hydra overrides
(see :func:`overrides_to_run_config`); both the ServerApp and the ClientApp rebuild the same
:class:`ExperimentConfig` from it with :func:`compose`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf


@dataclass
class TaskConfig:
    """What is being classified: class names (index = label id), views, modality."""

    name: str = "xray_fracture"
    classes: list[str] = field(default_factory=lambda: ["normal", "fracture"])
    positive_class: str | None = "fracture"
    views: list[str] = field(default_factory=list)
    modality: str = "xray"
    synthetic_task: str = "xray_fracture"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def is_binary(self) -> bool:
        return len(self.classes) == 2


@dataclass
class AugmentConfig:
    """Ranges of the training-time random transforms (``data.augmentation``).

    Geometry (crop, rotation, flip) stays mild: a strong crop can cut the finding away and a
    large rotation invents anatomy. The intensity transforms (gamma, blur, noise) imitate how
    hospitals' acquisition differs (contrast curve, sharpness, detector noise), so a model meets
    an unseen center's look in training. Ranges are [low, high]; gamma is drawn log-uniformly,
    ``blur_sigma`` is in pixels of the model's input, ``noise_std`` in units of the [0, 1]
    intensity range; [1, 1] / [0, 0] switch a transform off. ``collimation`` is the chance that
    an image gets bright bands along some of its edges, as a collimator's shutters leave on a
    radiograph (see :meth:`fedmsk.data.augment.SeededAugment.collimate`); 0 switches it off.
    ``intensity_start`` and ``intensity_warmup`` are shares of the run's steps: gamma, blur and
    noise are off until ``intensity_start``, then grow linearly to their full ranges at
    ``intensity_warmup`` (warm-up 0: full from the first step). They follow the run's global
    step, like the learning rate, so a federation ramps over its rounds.
    """

    crop_scale: list[float] = field(default_factory=lambda: [0.85, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [0.9, 1.1])
    rotation_degrees: float = 10.0
    brightness: float = 0.1
    contrast: float = 0.1
    gamma: list[float] = field(default_factory=lambda: [1.0, 1.0])
    blur_sigma: list[float] = field(default_factory=lambda: [0.0, 0.0])
    noise_std: list[float] = field(default_factory=lambda: [0.0, 0.0])
    hflip: bool = True
    collimation: float = 0.0
    intensity_warmup: float = 0.0
    intensity_start: float = 0.0

    def __post_init__(self) -> None:
        start, warmup = self.intensity_start, self.intensity_warmup
        if not (0.0 <= start < warmup <= 1.0 or start == warmup == 0.0):
            raise ValueError(
                "data.augmentation: need 0 <= intensity_start < intensity_warmup <= 1 (or both 0:"
                f" gamma, blur and noise at full range from the first step), got intensity_start"
                f" {start:g}, intensity_warmup {warmup:g}"
            )


@dataclass
class DataConfig:
    """Where the federation's site folders are and how images become tensors.

    ``root`` holds one folder per site (each with ``manifest.csv``) and ``federation.json``
    naming the training and held-out sites. ``synthetic_seed`` draws the built-in synthetic
    federation (another seed, another federation from the same generator). After
    augmentation, ``local_contrast`` (a Gaussian sigma in pixels of the model input; 0: off)
    divides each pixel's deviation from its neighbourhood by the neighbourhood's spread, and
    ``standardize`` gives every image zero mean and unit variance
    (:mod:`fedmsk.data.intensity`). In deployment each node
    reads only its own site directory from its node config; ``root`` is then unused on the
    server.
    """

    root: str = "data/synthetic"
    synthetic: bool = True
    synthetic_centers: int = 13
    synthetic_scale: float = 1.0
    synthetic_seed: int = 0
    image_size: int = 64
    in_chans: int = 1
    frame: str = "0"
    split_ratios: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    split_seed: int = 0
    cache_dir: str | None = None
    augment: bool = True
    augmentation: AugmentConfig = field(default_factory=AugmentConfig)
    standardize: bool = False
    local_contrast: float = 0.0
    local_contrast_floor: float = 0.02
    # auto: loader workers and pinned memory on a CUDA node, none on a CPU node
    # (fedmsk/data/loader_settings.py); a number is used as given
    num_workers: str = "auto"
    min_examples_per_class: int = 2

    def __post_init__(self) -> None:
        if self.local_contrast < 0 or self.local_contrast_floor <= 0:
            raise ValueError(
                "data.local_contrast must be >= 0 pixels (0: off) and data.local_contrast_floor"
                f" > 0, got {self.local_contrast:g} and {self.local_contrast_floor:g}"
            )


@dataclass
class ModelConfig:
    """A timm model by name; ``timm_kwargs`` go to ``timm.create_model`` (e.g. the channel
    widths of configs/model/resnet18_slim.yaml). ``timm_kwargs_for``: the architecture those
    arguments were written for; with another ``name`` (``model.name=resnet50`` set by value over
    the slim group) they are left out rather than given to a network they do not fit; so is
    ``stem_pool_stride`` and ``stem_conv_stride`` (the strides of a ResNet stem's max pool and
    of its 7x7 convolution, both 2 in timm; 4 in either lets a 128 px image reach the residual
    stages at the size a 64 px one would, see configs/model/resnet18_slim_conv4.yaml)."""

    name: str = "resnet18"
    pretrained: str | None = None
    dp_compatible: bool = False
    drop_rate: float = 0.0
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    timm_kwargs_for: str | None = None
    stem_pool_stride: int | None = None
    stem_conv_stride: int | None = None
    head_init_scale: float = 1.0


@dataclass
class TrainConfig:
    """One local round of training on one site (defaults mirror configs/train/default.yaml).

    ``local_steps``: optimizer steps per round, the same at every site (None: ``local_epochs``
    passes over the site's data, so a large site takes more steps). ``scheduler``,
    ``warmup_fraction`` and ``decay_fraction`` (the share of steps ``wsd`` decays over) shape
    the learning rate over the whole run's steps, not per round.
    ``keep_optimizer_state``: a site continues its optimizer's moments from round to round
    (kept on the node). ``precision``: fp32 | bf16 | fp16 | auto (bf16 where the hardware has
    it natively and the model is validated, see fedmsk.precision). ``centralized_epochs``:
    epochs of the pooled/local-only baselines (None: the federation's budget in images seen).
    """

    local_epochs: int = 1
    local_steps: int | None = None
    batch_size: int = 16
    lr: float = 0.001
    optimizer: str = "adamw"
    momentum: float = 0.9
    weight_decay: float = 0.01
    scheduler: str = "none"
    warmup_fraction: float = 0.0
    decay_fraction: float = 0.3
    keep_optimizer_state: bool = True
    class_weighting: str = "loss"
    proximal_mu: float = 0.0
    precision: str = "auto"
    channels_last: str = "auto"
    device: str = "auto"
    num_threads: str = "auto"
    max_steps: int | None = None
    progress: bool = False
    centralized_epochs: int | None = None


@dataclass
class StrategyConfig:
    """Which Flower strategy aggregates, and its knobs (unused knobs are ignored).

    ``norm_statistics``: ``global`` gives the aggregated model BatchNorm statistics that the
    training sites measure at its weights before it is evaluated (fedmsk.norm_stats);
    ``average`` keeps the example-weighted mean of the sites' running statistics.
    ``norm_statistics_images`` caps the images a site runs forward for it (0: all).
    ``keep_optimizer_state``: the default of ``train.keep_optimizer_state`` for this strategy
    (cyclic starts a fresh optimizer at each visit: a site's kept moments are a round stale
    there, measured in docs/benchmarks.md).
    """

    name: str = "fedavg"
    fraction_train: float = 1.0
    min_train_nodes: int = 2
    min_available_nodes: int = 2
    proximal_mu: float = 0.0
    server_learning_rate: float = 1.0
    server_momentum: float = 0.0
    eta: float = 0.01
    eta_l: float = 0.01
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    trim_beta: float = 0.2
    num_malicious_nodes: int = 0
    num_nodes_to_select: int = 1
    local_norm_layers: bool = False
    norm_statistics: str = "global"
    norm_statistics_images: int = 256
    keep_optimizer_state: bool = True


@dataclass
class PrivacyConfig:
    enabled: bool = False
    target_epsilon: float = 8.0
    target_delta: float | None = None
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    grad_sample_mode: str = "auto"
    # What the DP guarantee protects: "image" (every training image is a record) or "patient"
    # (each patient keeps one training image under DP, so removing a patient removes one record)
    unit: str = "image"
    # Opacus's own secure mode (torchcsprng for sampling and noise) where that package installs
    secure_mode: bool = False
    secure_aggregation: bool = False
    secagg_num_shares: int = 3
    secagg_reconstruction_threshold: int = 2
    secagg_clipping_range: float = 0.0
    secagg_max_weight: float = 10000.0


@dataclass
class FederationConfig:
    num_rounds: int = 3
    round_timeout_s: float = 600.0
    sites: list[str] = field(default_factory=list)
    heldout_sites: list[str] = field(default_factory=list)
    connect_timeout_s: float = 300.0
    client_num_cpus: int = 1
    client_num_gpus: float = 0.0
    min_reply_fraction: float = 0.5
    # A study needs an external test: a run without a held-out center is refused unless this
    # is set to false on purpose (a simulated federation without one sets it itself).
    require_heldout: bool = True
    # Absolute path of the coordinator's supernodes/node-ids.txt (register-supernodes.sh writes
    # it): the ServerApp then messages only the node registered for each listed site. "none"
    # takes aliases as declared (the simulation engine sets it: its nodes have no keys); a run
    # with neither is refused.
    node_registry: str = ""


@dataclass
class EvaluationConfig:
    """How results are computed. ``every_rounds``: validation at the training sites after every
    n-th round (the last round is always evaluated). ``heldout_each_round``: also score the
    held-out center during the run (off by default: a curve of the test center invites
    choosing a round on it; the final model is chosen without it)."""

    bootstrap: int = 0
    threshold: str = "youden"
    fixed_threshold: float = 0.5
    patient_aggregation: str = "mean"
    gradcam: bool = True
    gradcam_images: int = 4
    cam_method: str = "layercam"
    tensorboard: bool = False
    every_rounds: int = 1
    heldout_each_round: bool = False


@dataclass
class ExperimentConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    run_dir: str = "runs/latest"
    seed: int = 42
    resume: str | None = None
    study: str | None = None


_SCHEMA_REGISTERED = False


def sites_per_round(cfg: ExperimentConfig, training_sites: int) -> int:
    """Training sites a round asks when all are connected.

    Every site, unless an averaging strategy samples (``strategy.fraction_train`` < 1): then
    ``int(fraction_train x sites)``, at least ``strategy.min_train_nodes`` and at least one.
    Cyclic transfer visits every site and secure aggregation masks over every site, so both
    ask all of them whatever the fraction says.
    """
    fraction = cfg.strategy.fraction_train
    if fraction >= 1.0 or cfg.strategy.name == "cyclic" or cfg.privacy.secure_aggregation:
        return training_sites
    wanted = max(int(fraction * training_sites), cfg.strategy.min_train_nodes, 1)
    return min(training_sites, wanted)


def sampled_positions(count: int, size: int, seed: int, absolute_round: int) -> list[int]:
    """Which of ``count`` training sites (ordered by alias) a sampled round asks, ascending.

    Drawn from the run's seed and the absolute round only, so that the coordinator can tell
    every site in advance how many rounds it will be asked (:func:`planned_visits`), and a
    resumed run asks the same sites."""
    if size >= count:
        return list(range(count))
    rng = random.Random(f"fedmsk-sample-{seed}-{absolute_round}")
    return sorted(rng.sample(range(count), size))


def planned_visits(cfg: ExperimentConfig, training_aliases: list[str]) -> dict[str, int]:
    """Rounds each training site is asked to train over the whole run, when all are connected.

    A site under DP-SGD sizes its noise for these rounds: sized for every round, a site asked
    in a quarter of them spent only epsilon 2.6-4.9 of 8 under needlessly strong noise."""
    aliases = sorted(training_aliases)
    size = sites_per_round(cfg, len(aliases))
    visits = dict.fromkeys(aliases, 0)
    for absolute in range(1, max(1, cfg.federation.num_rounds) + 1):
        for i in sampled_positions(len(aliases), size, cfg.seed, absolute):
            visits[aliases[i]] += 1
    return visits


def describe_round(cfg: ExperimentConfig, training_sites: int) -> str:
    """What one round of a federated run trains, for results.json and the report: which sites,
    how far each goes and whether a site's optimizer restarts (said for cyclic, elsewhere only
    when it does), e.g. "3 of 12 training sites (seeded sample), 40 steps each"."""
    asked = sites_per_round(cfg, training_sites)
    if cfg.train.local_steps is not None:
        work = f"{cfg.train.local_steps} steps each"
    else:
        passes = max(1, cfg.train.local_epochs)
        work = f"{passes} pass{'es' if passes > 1 else ''} over its images each"
    if cfg.strategy.name == "cyclic":
        kept = cfg.train.keep_optimizer_state
        moments = "moments kept between visits" if kept else "fresh optimizer each visit"
        return f"all {training_sites} training sites in turn, {work}, {moments}"
    if not cfg.train.keep_optimizer_state:
        work += ", fresh optimizer each round"
    if asked < training_sites:
        return f"{asked} of {training_sites} training sites (seeded sample), {work}"
    return f"all {training_sites} training sites, {work}"


def describe_recipe(cfg: ExperimentConfig) -> str:
    """The optimizer, schedule and classifier start of a run, for its first line, results.json
    and the report: the two settings that decide whether training leaves the loss plateau
    (docs/benchmarks.md, "A zero head and a warm-up-stable-decay schedule") changed on
    2026-12-06, and the study protocols keep the ones before, so a reader of a figure must see
    which it was, e.g. "adamw lr 0.001, batch 16, 5% warm-up then wsd (decay over the last
    30%), zero classifier head"."""
    train = cfg.train
    name = train.scheduler.lower()
    schedules = {
        "none": "constant rate",
        "cosine": "cosine over the run",
        "step": "steps down at 50% and 75%",
        "wsd": f"wsd (decay over the last {train.decay_fraction:.0%})",
    }
    schedule = schedules.get(name, name)
    if train.warmup_fraction > 0:
        schedule = f"{train.warmup_fraction:.0%} warm-up then {schedule}"
    scale = cfg.model.head_init_scale
    head = (
        "zero classifier head"
        if scale == 0
        else "random classifier head"
        if scale == 1
        else f"random classifier head x{scale:g}"
    )
    return f"{train.optimizer} lr {train.lr:g}, batch {train.batch_size}, {schedule}, {head}"


def describe_input(cfg: ExperimentConfig) -> str:
    """How each image is normalised after augmentation, for the start of a run, results.json
    and the report (:meth:`fedmsk.data.intensity.InputNorm.describe`)."""
    from fedmsk.data.intensity import InputNorm

    return InputNorm.from_config(cfg.data).describe()


def describe_augmentation(cfg: ExperimentConfig) -> str:
    """The training-time transforms of a run, for its first lines, results.json and the
    report: the studies differ in them (geometric only, intensity, collimator bands) and a
    figure depends on them, e.g. "crop 85 to 100%, rotation up to 10 deg, flip, brightness
    x0.9 to 1.1, contrast x0.9 to 1.1". Written with "to", not dashes, and without degree
    signs, so the report's label filter keeps it."""
    if not cfg.data.augment:
        return "none"
    aug = cfg.data.augmentation

    def span(values: list[float], scale: float = 1.0, unit: str = "") -> str:
        low, high = (v * scale for v in values)
        return f"{low:g}{unit}" if low == high else f"{low:g} to {high:g}{unit}"

    parts = []
    if list(aug.crop_scale) != [1.0, 1.0]:
        parts.append(f"crop {span(aug.crop_scale, 100.0, '%')}")
    if aug.rotation_degrees > 0:
        parts.append(f"rotation up to {aug.rotation_degrees:g} deg")
    if aug.hflip:
        parts.append("flip")
    for name, amount in (("brightness", aug.brightness), ("contrast", aug.contrast)):
        if amount > 0:
            parts.append(f"{name} x{1 - amount:g} to {1 + amount:g}")
    intensity = []
    if list(aug.gamma) != [1.0, 1.0]:
        intensity.append(f"gamma {span(aug.gamma)}")
    if aug.blur_sigma[1] > 0:
        intensity.append(f"blur {span(aug.blur_sigma, unit=' px')}")
    if aug.noise_std[1] > 0:
        intensity.append(f"noise {span(aug.noise_std)}")
    if intensity and aug.intensity_warmup > 0:
        if aug.intensity_start > 0:
            ramp = (
                f"those three off for the first {aug.intensity_start:.0%} of steps, then ramped in"
                f" to full by {aug.intensity_warmup:.0%}"
            )
        else:
            ramp = f"those three ramped in over the first {aug.intensity_warmup:.0%} of steps"
        intensity[-1] += f" ({ramp})"
    parts += intensity
    if aug.collimation > 0:
        parts.append(f"collimator bands on {aug.collimation:.0%} of images")
    return ", ".join(parts) if parts else "none"


def sampled_privacy_note(cfg: ExperimentConfig, training_sites: int) -> str | None:
    """What DP-SGD does when rounds sample sites, for the start of a run; None otherwise."""
    asked = sites_per_round(cfg, training_sites)
    if not cfg.privacy.enabled or asked >= training_sites:
        return None
    return (
        f"DP-SGD with sampled rounds ({asked} of {training_sites} training sites a round): the "
        f"coordinator tells each site how many of the {cfg.federation.num_rounds} rounds its "
        "seeded sample will ask it, and the site sizes its noise for those; a site asked more "
        "often than planned (while others are offline) stops at its epsilon"
    )


def _register_schema() -> None:
    global _SCHEMA_REGISTERED
    if _SCHEMA_REGISTERED:
        return
    store = ConfigStore.instance()
    store.store(name="experiment_schema", node=ExperimentConfig)
    _SCHEMA_REGISTERED = True


def config_dir() -> Path:
    """The ``configs/`` directory: ``$FEDMSK_CONFIG_DIR`` or the one beside this package."""
    override = os.environ.get("FEDMSK_CONFIG_DIR")
    path = Path(override) if override else Path(__file__).resolve().parent.parent / "configs"
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(
            f"{path}: no config.yaml here; set FEDMSK_CONFIG_DIR to the fedmsk configs/ directory"
        )
    return path


def compose(overrides: list[str] | None = None) -> ExperimentConfig:
    """Compose ``configs/config.yaml`` with Hydra overrides and validate it against the schema."""
    _register_schema()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    return from_omegaconf(cfg)


def from_omegaconf(cfg: Any) -> ExperimentConfig:
    """Validate a composed DictConfig (e.g. the one ``@hydra.main`` passes) into dataclasses."""
    merged = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), cfg)
    obj = OmegaConf.to_object(merged)
    assert isinstance(obj, ExperimentConfig)
    return obj


def to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    return asdict(cfg)


def to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_hash(cfg: ExperimentConfig) -> str:
    """A stable hash of everything that changes the result (not where it is written)."""
    content = to_dict(cfg)
    content.pop("run_dir", None)
    content.pop("resume", None)
    content["federation"].pop("node_registry", None)  # how nodes are bound, not the result
    blob = json.dumps(content, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def override_key(item: str) -> str:
    """The setting a Hydra override names: ``+a.b=1`` and ``~a.b`` both name ``a.b``."""
    return item.split("=", 1)[0].lstrip("+~")


def dedupe_overrides(overrides: list[str]) -> list[str]:
    """Keep the last override of each key, as a later command-line value should win."""
    last: dict[str, str] = {}
    for item in overrides:
        key = override_key(item)
        last.pop(key, None)
        last[key] = item
    return list(last.values())


RUN_CONFIG_KEY = "fedmsk-overrides"


def overrides_to_run_config(overrides: list[str]) -> dict[str, str]:
    """Flower's run config carries only the Hydra overrides, JSON-encoded in one string."""
    return {RUN_CONFIG_KEY: json.dumps(list(overrides))}


def overrides_from_run_config(run_config: dict[str, Any]) -> list[str]:
    raw = run_config.get(RUN_CONFIG_KEY, "[]")
    value = json.loads(str(raw)) if raw else []
    if not isinstance(value, list):
        raise ValueError(f"run config {RUN_CONFIG_KEY!r} must be a JSON list of overrides")
    return [str(v) for v in value]
