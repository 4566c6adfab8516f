"""A node's round without Flower: FedBN keeps the site's own normalisation layers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedmsk.config import compose
from fedmsk.data.manifest import ManifestRow, write_manifest
from fedmsk.models import get_arrays, local_parameter_names
from fedmsk.site_runtime import ModelPool, SiteRuntime, SiteUnavailableError, free_of_opacus


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_site(tmp_path_factory.mktemp("node") / "site-a")


def write_site(root: Path) -> Path:
    """A 20-image PNG site, half of them with a bright bar (the "fracture")."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(1)
    rows = []
    for i in range(20):
        image = rng.normal(90, 25, (40, 40))
        if i % 2:
            image[10:30, 18:22] += 80
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "images" / f"{i}.png")
        rows.append(ManifestRow(f"images/{i}.png", ["normal", "fracture"][i % 2], f"P{i // 2}"))
    write_manifest(root, rows)
    return root


def _runtime(
    site: Path, tmp_path: Path, heldout: bool = False, extra: tuple[str, ...] = ()
) -> SiteRuntime:
    cfg = compose(
        [
            "strategy=fedbn",
            "model=resnet18",
            "data.image_size=32",
            "train.batch_size=8",
            f"run_dir={tmp_path / 'run'}",
            *extra,
        ]
    )
    return SiteRuntime(cfg, site, "site-a", heldout=heldout, seed=3)


def test_fedbn_site_keeps_its_norm_layers_across_rounds(site: Path, tmp_path: Path) -> None:
    first = _runtime(site, tmp_path)
    global_arrays = get_arrays(first.model)
    outcome = first.train(global_arrays, server_round=1)
    norm = local_parameter_names(first.model)
    assert norm and set(norm) <= set(outcome.arrays)
    trained = {k: outcome.arrays[k] for k in norm}
    changed = [k for k in norm if not np.allclose(trained[k], global_arrays[k])]
    assert changed, "training should move some normalisation statistics"

    second = _runtime(site, tmp_path)
    new_global = {k: v + 1.0 for k, v in global_arrays.items()}
    second.load_global(new_global)
    loaded = get_arrays(second.model)
    for key in changed:
        np.testing.assert_allclose(loaded[key], trained[key], err_msg=key)
    other = next(k for k in loaded if k not in norm)
    np.testing.assert_allclose(loaded[other], new_global[other])


def test_heldout_site_never_trains_and_evaluates_every_image(site: Path, tmp_path: Path) -> None:
    runtime = _runtime(site, tmp_path, heldout=True)
    arrays = get_arrays(runtime.model)
    with pytest.raises(SiteUnavailableError):
        runtime.train(arrays, server_round=1)
    result = runtime.evaluate(arrays, threshold=0.5)
    assert result.num_examples == 20 and result.summary["n"] == 20


def test_a_node_training_in_bf16_scores_in_fp32(site: Path, tmp_path: Path) -> None:
    """A reported figure must not depend on the node's hardware: same loss as fp32 scoring."""
    from fedmsk.site_runtime import all_images_loader
    from fedmsk.training import evaluate, resolve_device, training_precision

    runtime = _runtime(site, tmp_path, heldout=True, extra=("train.precision=bf16",))
    arrays = get_arrays(runtime.model)
    head = "fc.weight"  # a head of unit-variance weights: logits far from 0, where bf16 shows
    arrays[head] = np.random.default_rng(0).normal(0, 1, arrays[head].shape).astype(np.float32)
    outcome = runtime.evaluate(arrays, threshold=0.5)
    loader = all_images_loader(runtime.loaders, runtime.cfg)
    bf16 = training_precision(runtime.model, runtime.cfg.train, resolve_device("cpu"))
    assert bf16.name == "bf16"
    fp32_loss = evaluate(runtime.model, loader).loss
    bf16_loss = evaluate(runtime.model, loader, precision=bf16).loss
    assert bf16_loss != pytest.approx(fp32_loss, rel=1e-5), "bf16 should differ from fp32 here"
    assert outcome.metrics["eval-loss"] == pytest.approx(fp32_loss, rel=1e-5)


def test_a_pooled_model_trains_exactly_like_a_fresh_one(site: Path, tmp_path: Path) -> None:
    """Reusing a node's model across messages must not change a round's result."""
    cfg = compose(
        ["model=resnet18", "data.image_size=32", "train.batch_size=8", f"run_dir={tmp_path / 'r'}"]
    )
    pool = ModelPool()
    start = get_arrays(SiteRuntime(cfg, site, "site-a", heldout=False, seed=3).model)
    pooled = SiteRuntime(cfg, site, "site-a", heldout=False, seed=3, model_pool=pool)
    pooled.train({k: v + 0.01 for k, v in start.items()}, server_round=1)  # dirty the model
    reused = SiteRuntime(cfg, site, "site-a", heldout=False, seed=3, model_pool=pool)
    assert reused.model is pooled.model
    fresh = SiteRuntime(cfg, site, "site-a", heldout=False, seed=3)
    assert fresh.model is not pooled.model
    a = reused.train(start, server_round=2).arrays
    b = fresh.train(start, server_round=2).arrays
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_the_next_round_in_the_same_process_skips_reading_the_optimizer_state_back(
    site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pool hands the state a site wrote back to that site's next round once; a new
    process (no pool) and any other round read the file, and both train the same (under an
    averaging strategy: cyclic starts a fresh optimizer at each visit)."""
    import torch

    cfg = compose(
        [
            "model=resnet18",
            "data.image_size=32",
            "train.batch_size=8",
            "strategy=fedavg",
            f"run_dir={tmp_path / 'r'}",
        ]
    )
    pool = ModelPool()
    first = SiteRuntime(cfg, site, "site-a", heldout=False, seed=3, model_pool=pool)
    start = get_arrays(first.model)
    first.train(start, server_round=1)
    reads: list[object] = []
    real_load = torch.load

    def counting_load(*args: object, **kwargs: object) -> object:
        reads.append(args[0])
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    held = SiteRuntime(cfg, site, "site-a", heldout=False, seed=3, model_pool=pool)
    a = held.train(start, server_round=2).arrays
    assert reads == [], "the state written in round 1 should come from the pool"
    assert pool.take_optimizer_state(held.state_dir, 1) is None, "handed out once only"
    b = SiteRuntime(cfg, site, "site-a", heldout=False, seed=3).train(start, server_round=2).arrays
    assert len(reads) == 1, "a runtime without the pool reads the file"
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    other_site = tmp_path / "elsewhere"
    pool.keep_optimizer_state(held.state_dir, 2, {"state": {}})
    assert pool.take_optimizer_state(other_site, 2) is None
    assert pool.take_optimizer_state(held.state_dir, 2) is None, "a miss drops the held state"


def test_model_pool_reuses_a_dp_model_only_once_opacus_has_let_go(tmp_path: Path) -> None:
    from opacus import GradSampleModule

    pool = ModelPool()
    private = compose(["model=resnet18_slim", "privacy=dp", f"run_dir={tmp_path / 'r'}"])
    model = pool.get(private)
    assert free_of_opacus(model) and pool.get(private) is model
    wrapped = GradSampleModule(model)  # a round's wrapper that was never cleaned up
    assert not free_of_opacus(model)
    assert pool.get(private) is not model  # a new model rather than one with Opacus' hooks
    wrapped.cleanup()
    assert free_of_opacus(model)


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ew"])
def test_a_model_reused_after_a_dp_round_trains_exactly_like_a_fresh_one(
    tmp_path: Path, mode: str
) -> None:
    """A node's model, wrapped by Opacus for one round and unhooked, then given the next round's
    global weights: same seeded DP round, same arrays as a freshly built model."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from fedmsk.config import PrivacyConfig, TrainConfig
    from fedmsk.models import set_arrays
    from fedmsk.privacy import DPSession
    from fedmsk.training import fit

    cfg = compose(
        ["model=resnet18_slim", "privacy=dp", "data.image_size=32", f"run_dir={tmp_path / 'r'}"]
    )
    train = TrainConfig(
        batch_size=8, class_weighting="none", device="cpu", precision="fp32", num_threads=1
    )
    gen = torch.Generator().manual_seed(0)
    images, labels = torch.rand(32, 1, 32, 32, generator=gen), torch.arange(32) % 2
    data = DataLoader(TensorDataset(images, labels), batch_size=8, shuffle=True, generator=gen)

    def dp_round(model: torch.nn.Module, name: str, seed: int) -> dict[str, np.ndarray]:
        session = DPSession.for_site(
            PrivacyConfig(enabled=True, grad_sample_mode=mode),
            state_path=tmp_path / name / "p.json",
            num_examples=32,
            batch_size=8,
            steps_per_round=4,
            planned_rounds=2,
            seed=seed,
        )
        torch.manual_seed(5)
        gen.manual_seed(5)
        fit(model, data, train, 2, privacy=session)
        assert free_of_opacus(model)
        return get_arrays(model)

    pool = ModelPool()
    reused = pool.get(cfg)
    start = get_arrays(reused)
    dp_round(reused, "earlier", seed=1)  # the message before: wraps, trains and unhooks
    assert pool.get(cfg) is reused
    set_arrays(reused, start)
    fresh = ModelPool().get(cfg)
    set_arrays(fresh, start)
    a, b = dp_round(reused, "a", seed=2), dp_round(fresh, "b", seed=2)
    assert a.keys() == b.keys()
    assert any(not np.array_equal(a[k], start[k]) for k in a)  # the round did train
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_under_dp_a_site_with_static_augmented_copies_refuses_to_train(tmp_path: Path) -> None:
    """The guarantee protects one image; a copy would add its original's contribution again."""
    from fedmsk.data.augment import static_augment

    site = write_site(tmp_path / "site-a")
    assert static_augment(site, 1, seed=0) > 0
    cfg = compose(
        [
            "model=resnet18_slim",
            "privacy=dp",
            "data.image_size=32",
            "train.batch_size=8",
            f"run_dir={tmp_path / 'run'}",
        ]
    )
    runtime = SiteRuntime(cfg, site, "site-a", heldout=False, seed=3)
    with pytest.raises(SiteUnavailableError, match="statically augmented copies") as err:
        runtime.train(get_arrays(runtime.model), server_round=1)
    assert str(tmp_path) not in str(err.value)
    assert not (site / ".fedmsk" / "privacy-ledger.json").exists()  # nothing was spent


def test_patient_level_dp_trains_on_one_image_per_patient(tmp_path: Path) -> None:
    """privacy.unit=patient: a patient is at most one record, so the guarantee covers patients."""
    site = write_site(tmp_path / "site-a")  # 20 images of 10 patients, 2 each

    def runtime(*extra: str) -> SiteRuntime:
        cfg = compose(
            ["model=resnet18_slim", "data.image_size=32", f"run_dir={tmp_path / 'r'}", *extra]
        )
        return SiteRuntime(cfg, site, "site-a", heldout=False, seed=3)

    per_image = runtime("privacy=dp").loaders.dataset("train")
    per_patient = runtime("privacy=dp", "privacy.unit=patient").loaders.dataset("train")
    assert per_image is not None and per_patient is not None
    patients = set(per_image.patient_ids())
    assert len(per_image) > len(patients)  # some patient has two training images
    assert sorted(per_patient.patient_ids()) == sorted(patients)
    # the same image each time (by content), and the augmentation is kept
    again = runtime("privacy=dp", "privacy.unit=patient").loaders.dataset("train")
    assert again is not None and [i.path for i in again.items] == [
        i.path for i in per_patient.items
    ]
    assert per_patient.transform is not None
    # without DP the unit changes nothing
    plain = runtime("privacy.unit=patient").loaders.dataset("train")
    assert plain is not None and len(plain) == len(per_image)
    with pytest.raises(ValueError, match="privacy.unit='family'"):
        runtime("privacy=dp", "privacy.unit=family")


def test_a_site_sizes_its_dp_noise_for_the_rounds_it_is_planned_to_train(tmp_path: Path) -> None:
    """Asked in 2 of 8 rounds, a site plans 2 rounds of noise (weaker noise than for 8, the same
    epsilon); a status asked before its first round does not fix the plan."""
    import json

    site = write_site(tmp_path / "site-a")

    def runtime(name: str) -> SiteRuntime:
        cfg = compose(
            [
                "model=resnet18_slim",
                "privacy=dp",
                "data.image_size=32",
                "train.batch_size=8",
                "train.local_steps=2",
                "federation.num_rounds=8",
                f"run_dir={tmp_path / name}",
            ]
        )
        return SiteRuntime(cfg, site, "site-a", heldout=False, seed=3)

    planned, every = runtime("planned"), runtime("every")
    assert planned.state_dir != every.state_dir
    before = planned.privacy_status()  # before the first round: reported, but not fixed
    assert before["epsilon"] == 0 and before["budget-exhausted"] == 0
    assert not (planned.state_dir / "privacy.json").exists()
    planned.train(get_arrays(planned.model), server_round=1, planned_rounds=2)
    every.train(get_arrays(every.model), server_round=1)
    states = {
        name: json.loads((r.state_dir / "privacy.json").read_text())
        for name, r in (("planned", planned), ("every", every))
    }
    assert states["planned"]["planned_rounds"] == 2 and states["every"]["planned_rounds"] == 8
    assert states["planned"]["noise_multiplier"] < states["every"]["noise_multiplier"]
    status = planned.privacy_status()
    assert status["noise-multiplier"] == pytest.approx(states["planned"]["noise_multiplier"])
    assert 0 < status["epsilon"] < status["epsilon-target"]


def test_a_node_keeps_the_optimizer_moments_of_its_latest_runs_only(tmp_path: Path) -> None:
    """Each run leaves its moments on the node (a node never hears that a run ended); after a
    sixth run only the latest KEPT_OPTIMIZER_RUNS runs have them, the others keep their
    folders, and the node's own log says what was removed."""
    from fedmsk.site_runtime import KEPT_OPTIMIZER_RUNS

    node = write_site(tmp_path / "site-b")
    order = []
    for k in range(KEPT_OPTIMIZER_RUNS + 2):
        cfg = compose(
            [
                "model=resnet18",
                "data.image_size=32",
                "train.batch_size=8",
                "strategy=fedavg",
                f"run_dir={tmp_path / f'run{k}'}",
            ]
        )
        runtime = SiteRuntime(cfg, node, "site-b", heldout=False, seed=3)
        runtime.train(get_arrays(runtime.model), server_round=1)
        order.append(runtime.state_dir)
    with_moments = [d for d in order if list(d.glob("optimizer-r*.pt"))]
    assert with_moments == order[-KEPT_OPTIMIZER_RUNS:]
    assert all(d.is_dir() for d in order)
    log = (node / ".fedmsk" / "logs" / "node.log").read_text()
    assert log.count("removed the optimizer moments of runs older than the latest") == 2
