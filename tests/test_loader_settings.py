"""``data.num_workers``: workers and pinned memory for GPU nodes, none for CPU nodes, and
augmentation streams that stay distinct and repeatable with real worker processes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from fedmsk.commands.simulate import _simulated_loader_workers
from fedmsk.config import DataConfig, TrainConfig, compose
from fedmsk.data.augment import SeededAugment, worker_init_fn
from fedmsk.data.dataset import build_site_loaders
from fedmsk.data.loader_settings import (
    GPU_PREFETCH_FACTOR,
    MAX_AUTO_WORKERS,
    parse_num_workers,
    resolve_loader_settings,
)
from tests.test_dataset import TASK, _site

torch.set_num_threads(1)


def test_auto_gives_a_cpu_node_no_workers_and_a_gpu_node_one_per_spare_core() -> None:
    cpu = resolve_loader_settings("auto", "cpu", cores=16)
    assert (cpu.num_workers, cpu.pin_memory, cpu.persistent_workers) == (0, False, False)
    assert "prefetch_factor" not in cpu.loader_kwargs()  # DataLoader refuses it without workers
    assert resolve_loader_settings("auto", "mps", cores=8).num_workers == 0
    for cores, workers in ((16, MAX_AUTO_WORKERS), (4, 3), (2, 1)):
        gpu = resolve_loader_settings("auto", "cuda", cores=cores)
        assert gpu.num_workers == workers and gpu.pin_memory and gpu.persistent_workers
        assert gpu.loader_kwargs()["prefetch_factor"] == GPU_PREFETCH_FACTOR
    lone = resolve_loader_settings("auto", "cuda", cores=1)  # no spare core: pinned, in process
    assert lone.num_workers == 0 and lone.pin_memory and not lone.persistent_workers


def test_an_explicit_count_is_used_anywhere_and_nonsense_is_refused() -> None:
    cpu = resolve_loader_settings("3", "cpu", cores=2)
    assert cpu.num_workers == 3 and cpu.persistent_workers and not cpu.pin_memory
    assert resolve_loader_settings(2, "cuda", cores=64).num_workers == 2
    assert resolve_loader_settings(0, "cuda", cores=64).num_workers == 0
    assert parse_num_workers(" AUTO ") is None and parse_num_workers(None) is None
    for bad in ("-1", "many", "2.5"):
        with pytest.raises(ValueError, match=r"data\.num_workers"):
            parse_num_workers(bad)


def test_the_default_is_auto_in_the_schema_and_both_data_groups() -> None:
    assert DataConfig().num_workers == "auto"
    assert compose([]).data.num_workers == "auto"
    assert compose(["data=sites", "data.root=/nowhere"]).data.num_workers == "auto"
    assert compose(["data.num_workers=4"]).data.num_workers == "4"


def test_a_simulation_counts_the_cores_one_site_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = compose([])
    # this machine's device: a CPU node gets no workers, written into the run's overrides
    if not torch.cuda.is_available():
        assert _simulated_loader_workers(cfg, [], []) == ["data.num_workers=0"]
    assert _simulated_loader_workers(cfg, ["data.num_workers=5"], []) == []
    import fedmsk.training

    monkeypatch.setattr(fedmsk.training, "resolve_device", lambda name: torch.device("cuda"))
    # averaging strategies: several sites at once, one CPU each -> no spare core
    assert _simulated_loader_workers(cfg, [], []) == ["data.num_workers=0"]
    # cyclic: the one training site is given 6 CPUs -> 5 workers, not one per machine core
    assert _simulated_loader_workers(cfg, [], ["federation.client_num_cpus=6"]) == [
        "data.num_workers=5"
    ]


class _SameImage(Dataset):
    """Every item is one constant image through a seeded augmentation: two items come out
    equal exactly when their augmentation draws were equal."""

    def __init__(self, length: int, seed: int) -> None:
        self.length = length
        self.transform = SeededAugment(seed=seed)
        self.image = torch.linspace(0, 1, 32 * 32).reshape(1, 32, 32)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(self.image.clone())


def _first_items_per_worker(dataset: Dataset, workers: int) -> list[torch.Tensor]:
    loader = DataLoader(
        dataset,
        batch_size=1,
        num_workers=workers,
        worker_init_fn=worker_init_fn,
        generator=torch.Generator().manual_seed(0),
    )
    batches = [batch[0] for _, batch in zip(range(workers), loader, strict=False)]
    return batches  # batch k comes from worker k (round robin)


@pytest.mark.parametrize("pooled", [False, True], ids=["one-site", "pooled-concat"])
def test_each_worker_draws_its_own_augmentation_stream(pooled: bool) -> None:
    dataset: Dataset = (
        ConcatDataset([_SameImage(4, seed=7), _SameImage(4, seed=7)])
        if pooled
        else _SameImage(8, seed=7)
    )
    first = _first_items_per_worker(dataset, 2)
    # without reseeding (a ConcatDataset hides its parts' transforms) both workers repeat one
    # stream and their first images are identical
    assert not torch.equal(first[0], first[1])
    again = _first_items_per_worker(dataset, 2)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def _epochs(loader: DataLoader, count: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    return [[(images.clone(), labels.clone()) for images, labels in loader] for _ in range(count)]


def test_site_loaders_with_real_workers_are_repeatable_and_see_every_image(tmp_path: Path) -> None:
    site = _site(tmp_path)
    data = DataConfig(image_size=32, in_chans=1, augment=True, num_workers="2")
    train = TrainConfig(batch_size=4, device="cpu")
    first = build_site_loaders(site, TASK, data, train, seed=3)
    assert first.train.num_workers == 2 and first.train.persistent_workers
    assert first.val.num_workers == 0  # evaluation reads cached arrays in order
    runs = [
        _epochs(first.train, 2),
        _epochs(build_site_loaders(site, TASK, data, train, 3).train, 2),
    ]
    for epoch_a, epoch_b in zip(*runs, strict=True):
        assert len(epoch_a) == len(epoch_b) == len(first.train)
        for (images_a, labels_a), (images_b, labels_b) in zip(epoch_a, epoch_b, strict=True):
            assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)
    # persistent workers keep drawing: the second epoch is augmented anew
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(runs[0][0], runs[0][1], strict=True))
    size = len(first.dataset("train"))
    assert sum(len(batch) for _, batch in runs[0][0]) == size // 4 * 4  # whole batches only
    in_process = build_site_loaders(site, TASK, DataConfig(image_size=32, in_chans=1), train, 3)
    assert in_process.train.num_workers == 0  # auto on a CPU device
    assert len(in_process.train) == len(first.train)
