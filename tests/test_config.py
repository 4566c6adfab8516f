"""Hydra composition into the typed schema, and the run-config round trip to Flower."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from fedmsk.config import (
    ExperimentConfig,
    compose,
    config_hash,
    describe_augmentation,
    describe_recipe,
    describe_round,
    overrides_from_run_config,
    overrides_to_run_config,
    sampled_privacy_note,
    sites_per_round,
)
from fedmsk.report_data import safe_label
from fedmsk.studies import study_names


def test_default_composes_into_the_schema() -> None:
    cfg = compose([])
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.task.classes == ["normal", "fracture"]
    assert cfg.strategy.name == "cyclic"  # the default that keeps up with pooled training
    assert cfg.privacy.enabled is False
    assert cfg.model.dp_compatible is False
    assert cfg.model.timm_kwargs["output_stride"] == 16
    assert cfg.model.stem_conv_stride == 4 and cfg.model.stem_pool_stride is None
    assert cfg.data.image_size == 128
    assert cfg.train.local_steps == 10 and cfg.train.scheduler == "wsd"
    assert cfg.model.head_init_scale == 0.0  # a zero classifier at the start
    assert cfg.data.synthetic_seed == 0 and cfg.data.root.endswith("-seed0")


@pytest.mark.parametrize(
    "name",
    [
        "fedavg",
        "fedprox",
        "fedadam",
        "fedyogi",
        "fedadagrad",
        "fedavgm",
        "fedmedian",
        "fedtrimmedavg",
        "krum",
        "fedbn",
        "cyclic",
    ],
)
def test_every_strategy_group_composes(name: str) -> None:
    assert compose([f"strategy={name}"]).strategy.name == name


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedprox", "fedadam", "fedbn", "krum"])
def test_cyclic_starts_a_fresh_optimizer_each_visit_and_averaging_keeps_its_moments(
    name: str,
) -> None:
    """Under cyclic a site's kept moments are a round stale; averaging strategies keep them;
    the command line can say otherwise either way."""
    assert compose([]).strategy.name == "cyclic"
    assert compose([]).train.keep_optimizer_state is False
    assert compose([f"strategy={name}"]).train.keep_optimizer_state is True
    assert compose(["train.keep_optimizer_state=true"]).train.keep_optimizer_state is True
    told = compose([f"strategy={name}", "strategy.keep_optimizer_state=false"])
    assert told.train.keep_optimizer_state is False


@pytest.mark.parametrize(
    "study", ["dislocation_xray", "femoral_device_xray", "vcf_xray", "gout_mtp1_us"]
)
def test_studies_with_one_to_four_training_centers_keep_their_moments(study: str) -> None:
    """Their moments are at most a few visits old; the 12-center ATFL study follows cyclic."""
    assert compose([f"study={study}"]).train.keep_optimizer_state is True
    assert compose(["study=atfl_us"]).train.keep_optimizer_state is False


@pytest.mark.parametrize("study", study_names())
def test_every_study_trains_with_the_projects_recipe(study: str) -> None:
    """The zero head and warm-up-stable-decay schedule, at both scales: with local contrast
    normalisation it measured higher on the ATFL and femoral protocols too (docs/studies.md),
    the last two that kept the random head and cosine."""
    for overrides in ([], ["scale=paper"]):
        cfg = compose([f"study={study}", *overrides])
        assert cfg.model.head_init_scale == 0.0 and cfg.train.scheduler == "wsd"


@pytest.mark.parametrize("study", ["atfl_us", "femoral_device_xray"])
def test_the_earlier_recipe_can_be_asked_for_to_reproduce_earlier_figures(study: str) -> None:
    """`+recipe=random_head_cosine` gives the random head and cosine the ATFL and femoral
    figures before 2026-12-07 were measured with, over the study's own settings."""
    cfg = compose([f"study={study}", "+recipe=random_head_cosine"])
    assert cfg.model.head_init_scale == 1.0 and cfg.train.scheduler == "cosine"
    assert cfg.data.local_contrast == compose([f"study={study}"]).data.local_contrast


def test_groups_interpolate_into_each_other() -> None:
    cfg = compose(["strategy=fedprox", "privacy=eps8", "model=efficientnet_b0"])
    assert cfg.train.proximal_mu == cfg.strategy.proximal_mu > 0
    assert cfg.privacy.enabled and cfg.privacy.target_epsilon == 8.0
    assert cfg.model.dp_compatible is True
    assert cfg.model.name == "efficientnet_b0"


def test_a_typo_fails_with_the_setting_named() -> None:
    with pytest.raises((ConfigCompositionException, ValidationError)) as info:
        compose(["train.batchsize=8"])
    assert "batchsize" in str(info.value)


def test_a_wrong_type_is_refused() -> None:
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose(["train.batch_size=many"])


def test_run_config_carries_only_overrides_and_rebuilds_the_same_config() -> None:
    overrides = ["strategy=fedprox", "federation.num_rounds=4", "run_dir=/tmp/x"]
    run_config = overrides_to_run_config(overrides)
    assert list(run_config) == ["fedmsk-overrides"]
    assert overrides_from_run_config(run_config) == overrides
    assert config_hash(compose(overrides_from_run_config(run_config))) == config_hash(
        compose(overrides)
    )


def test_config_hash_ignores_where_results_go_but_not_what_is_run() -> None:
    base = config_hash(compose(["run_dir=/tmp/a"]))
    assert base == config_hash(compose(["run_dir=/tmp/b"]))
    assert base != config_hash(compose(["run_dir=/tmp/a", "seed=7"]))


@pytest.mark.parametrize(
    "name", ["fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedbn"]
)
def test_averaging_strategies_sample_a_quarter_of_the_sites_for_40_steps(name: str) -> None:
    """configs/recipe/sampled_rounds.yaml, unless SecAgg+ (which masks over every site) or
    the command line says otherwise; cyclic and the robust aggregators ask every site."""
    cfg = compose([f"strategy={name}"])
    assert (cfg.strategy.fraction_train, cfg.train.local_steps) == (0.25, 40)
    assert sites_per_round(cfg, 12) == 3 and sites_per_round(cfg, 4) == 2
    secure = compose([f"strategy={name}", "privacy=secagg"])
    assert (secure.strategy.fraction_train, secure.train.local_steps) == (1.0, 10)
    assert sites_per_round(secure, 12) == 12
    told = compose([f"strategy={name}", "train.local_steps=5", "strategy.fraction_train=0.5"])
    assert (told.strategy.fraction_train, told.train.local_steps) == (0.5, 5)


def test_a_round_is_described_by_the_sites_it_asks_and_their_work() -> None:
    assert describe_round(compose(["strategy=fedavg"]), 12) == (
        "3 of 12 training sites (seeded sample), 40 steps each"
    )
    assert describe_round(compose([]), 12) == (
        "all 12 training sites in turn, 10 steps each, fresh optimizer each visit"
    )
    kept = compose(["train.keep_optimizer_state=true"])
    assert describe_round(kept, 4).endswith("in turn, 10 steps each, moments kept between visits")
    fresh = compose(["strategy=fedavg", "strategy.keep_optimizer_state=false"])
    assert describe_round(fresh, 12).endswith("40 steps each, fresh optimizer each round")
    # the report shows it only as a label of at most 100 characters (fedmsk.report_data)
    longest = [
        "strategy.keep_optimizer_state=false",
        "train.local_steps=null",
        "train.local_epochs=2",
    ]
    assert len(describe_round(compose(["strategy=fedavg", *longest]), 120)) <= 100
    one_pass = compose(["privacy=secagg", "train.local_steps=null"])
    assert describe_round(one_pass, 5) == "all 5 training sites, 1 pass over its images each"


def test_a_run_names_its_schedule_and_head_so_a_figure_says_which_recipe_made_it() -> None:
    # the default recipe and the earlier one figures were measured with must read differently
    assert describe_recipe(compose([])) == (
        "adamw lr 0.001, batch 16, 5% warm-up then wsd (decay over the last 30%), "
        "zero classifier head"
    )
    earlier = compose(["study=femoral_device_xray", "+recipe=random_head_cosine"])
    assert describe_recipe(earlier).endswith(
        "5% warm-up then cosine over the run, random classifier head"
    )
    other = compose(
        ["train.warmup_fraction=0", "train.decay_fraction=0.2", "model.head_init_scale=0.5"]
    )
    assert describe_recipe(other).endswith(
        "batch 16, wsd (decay over the last 20%), random classifier head x0.5"
    )
    # shown in the report as a label of at most 100 plain characters (fedmsk.report_data)
    assert safe_label(describe_recipe(other), "(withheld)", 100) == describe_recipe(other)


def test_a_run_names_its_augmentation_because_the_studies_differ_in_it() -> None:
    default = describe_augmentation(compose([]))
    assert default == (
        "crop 85 to 100%, rotation up to 10 deg, flip, brightness x0.9 to 1.1, "
        "contrast x0.9 to 1.1, gamma 0.7 to 1.5, blur 0 to 1 px, noise 0 to 0.05 "
        "(those three off for the first 30% of steps, then ramped in to full by 60%)"
    )
    geometric = describe_augmentation(compose(["study=gout_mtp1_us"]))
    assert geometric.endswith("flip, brightness x0.9 to 1.1, contrast x0.9 to 1.1")
    assert describe_augmentation(compose(["study=vcf_xray"])).endswith(
        "collimator bands on 30% of images"
    )
    assert describe_augmentation(compose(["data.augment=false"])) == "none"
    off = ["data.augmentation.hflip=false", "data.augmentation.rotation_degrees=0"]
    assert "flip" not in describe_augmentation(compose(off))
    # the VCF protocol keeps gamma / blur / noise from the first step, as it was measured
    assert "ramped" not in describe_augmentation(compose(["study=vcf_xray"]))
    # the ramp is said of the intensity transforms, before the collimator bands
    both = describe_augmentation(
        compose(["study=vcf_xray", "data.augmentation.intensity_warmup=0.5"])
    )
    assert both.endswith(
        "noise 0 to 0.05 (those three ramped in over the first 50% of steps), "
        "collimator bands on 30% of images"
    )
    # shown in the report as a label of at most 240 plain characters (fedmsk.report_data)
    assert safe_label(default, "(withheld)", 240) == default


def test_dp_asks_every_site_because_each_sizes_its_noise_for_every_round() -> None:
    for privacy in ("dp", "eps1", "eps8"):
        cfg = compose(["strategy=fedavg", f"privacy={privacy}"])
        assert (cfg.strategy.fraction_train, cfg.train.local_steps) == (1.0, 10)
        assert sampled_privacy_note(cfg, 12) is None
    sampled = compose(["strategy=fedavg", "privacy=eps8", "strategy.fraction_train=0.25"])
    note = sampled_privacy_note(sampled, 12)
    assert note is not None and "3 of 12" in note and "sizes its noise for those" in note
    assert sampled_privacy_note(compose(["strategy=fedavg"]), 12) is None  # no DP


@pytest.mark.parametrize("name", ["cyclic", "fedmedian", "fedtrimmedavg", "krum"])
def test_other_strategies_ask_every_site(name: str) -> None:
    cfg = compose([f"strategy={name}"])
    assert sites_per_round(cfg, 12) == 12 and cfg.train.local_steps == 10


def test_secure_aggregation_selects_a_weighted_mean_strategy() -> None:
    """SecAgg+ sums updates, so privacy=secagg moves off the default (cyclic) strategy."""
    assert compose(["privacy=secagg"]).strategy.name == "fedavg"
    assert compose(["privacy=secagg", "strategy=fedavgm"]).strategy.name == "fedavgm"
    assert compose(["strategy=fedprox", "privacy=secagg"]).strategy.name == "fedprox"
    assert compose(["privacy=secagg"]).privacy.secure_aggregation is True
