"""``fedmsk simulate``, ``fedmsk compare`` and ``fedmsk demo``: the researcher's entry points.

Each takes Hydra overrides (``strategy=fedprox model=efficientnet_b0 federation.num_rounds=5``);
``-m`` / ``--multirun`` sweeps comma-separated values as Hydra's multirun does. Relative paths
in the config are made absolute here, because the Flower apps run in other working
directories. With the synthetic data config, the federation is generated on first use.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("fedmsk")

# The demo is the project's defaults (configs/): the 13-center synthetic federation, the slim
# ResNet-18, cyclic weight transfer for 24 rounds. Bootstrap CIs are left out to save time
# (DeLong CIs are always computed).
DEMO_OVERRIDES = ["evaluation.bootstrap=0"]


def register(subparsers: argparse._SubParsersAction) -> None:
    simulate = subparsers.add_parser(
        "simulate",
        help="run a federated study in Flower's simulation engine",
        description="Run the fedmsk Flower app on every site of a local federation. "
        "Extra arguments are Hydra overrides, e.g. strategy=fedprox privacy=eps8.",
    )
    simulate.add_argument("-m", "--multirun", action="store_true", help="sweep a,b,c values")
    simulate.add_argument("--no-report", action="store_true", help="skip the report")
    simulate.set_defaults(func=run_simulate, accepts_overrides=True)

    compare = subparsers.add_parser(
        "compare",
        help="pooled vs local-only vs federated on the same splits, one table",
        description="Train pooled, local-only at each training center and the federated "
        "strategies, then write one comparison table (per-center validation AUC and held-out "
        "AUC with DeLong CIs). Extra arguments are Hydra overrides.",
    )
    compare.add_argument(
        "--strategies", default="fedavg,fedprox", help="federated strategies (comma-separated)"
    )
    compare.add_argument("--out", default=None, help="output directory (default runs/compare-TASK)")
    compare.add_argument("--skip-local", action="store_true", help="no local-only baselines")
    compare.set_defaults(func=run_compare, accepts_overrides=True)

    demo = subparsers.add_parser(
        "demo",
        help="generate the synthetic 13-center federation, run it, write the report",
    )
    demo.add_argument("--out", default="demo", help="where data and run go (default ./demo)")
    demo.set_defaults(func=run_demo, accepts_overrides=True)


# -- configuration -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedRun:
    cfg: Any
    overrides: list[str]
    num_sites: int


def _abs(path: str) -> str:
    return str(Path(path).expanduser().resolve())


def prepare(overrides: list[str]) -> PreparedRun:
    """Compose, make paths absolute, generate synthetic data if needed, name the sites."""
    from fedmsk.config import compose, dedupe_overrides
    from fedmsk.data.federation import FEDERATION_FILE, load_federation

    overrides = dedupe_overrides(overrides)
    cfg = compose(overrides)
    fixed = list(overrides)
    if cfg.resume:
        fixed.append(f"run_dir={_abs(cfg.resume)}")
        fixed.append(f"resume={_abs(cfg.resume)}")
    else:
        fixed.append(f"run_dir={_abs(cfg.run_dir)}")
    root = Path(_abs(cfg.data.root))
    fixed.append(f"data.root={root}")
    if cfg.data.synthetic and not (root / FEDERATION_FILE).is_file():
        from fedmsk.data.synthetic import generate_federation

        print(f"generating the synthetic {cfg.task.synthetic_task} federation ...", flush=True)
        generate_federation(
            root,
            task=cfg.task.synthetic_task,
            centers=cfg.data.synthetic_centers,
            seed=cfg.data.synthetic_seed,
            scale=cfg.data.synthetic_scale,
        )
    federation = load_federation(root)
    drawn = json.loads((root / FEDERATION_FILE).read_text()).get("seed", 0)
    if cfg.data.synthetic and drawn != cfg.data.synthetic_seed:
        raise ValueError(
            f"{root / FEDERATION_FILE} was drawn with seed {drawn}, but "
            f"data.synthetic_seed={cfg.data.synthetic_seed}: point data.root elsewhere"
        )
    aliases = [s.alias for s in federation.sites]
    fixed.append("federation.sites=[" + ",".join(aliases) + "]")
    if not cfg.federation.heldout_sites:
        heldout = [s.alias for s in federation.heldout_sites]
        fixed.append("federation.heldout_sites=[" + ",".join(heldout) + "]")
        if not heldout:  # this federation has no external center: say so, do not refuse
            print(f"note: {root / FEDERATION_FILE} marks no held-out center", flush=True)
            fixed.append("federation.require_heldout=false")
    unknown = set(cfg.federation.heldout_sites) - set(aliases)
    if unknown:
        raise ValueError(
            f"federation.heldout_sites: {', '.join(sorted(unknown))} "
            f"not in {root / FEDERATION_FILE}"
        )
    resources = _sequential_resources(cfg, overrides)
    resources += _simulated_threads(cfg, overrides, resources)
    fixed += resources + _simulated_loader_workers(cfg, overrides, resources)
    fixed = dedupe_overrides(fixed)
    return PreparedRun(compose(fixed), fixed, len(aliases))


SEQUENTIAL_STRATEGIES = ("cyclic",)


def _sequential_resources(cfg: Any, overrides: list[str]) -> list[str]:
    """A strategy that trains one site at a time gives that site every core this process may
    use (threads and the simulation's CPU share), unless the command line set them."""
    from fedmsk.config import override_key
    from fedmsk.data.loader_settings import usable_cores

    if cfg.strategy.name not in SEQUENTIAL_STRATEGIES:
        return []
    cores = usable_cores()
    keys = {override_key(item) for item in overrides}
    extra = []
    if "train.num_threads" not in keys:
        extra.append(f"train.num_threads={cores}")
    if "federation.client_num_cpus" not in keys:
        extra.append(f"federation.client_num_cpus={cores}")
    return extra


def _simulated_threads(cfg: Any, overrides: list[str], resources: list[str]) -> list[str]:
    """Every simulated site shares this machine, so ``train.num_threads=auto`` becomes the
    cores the engine gives one site (``federation.client_num_cpus``): sites that train side by
    side must not each take every core (torch's waiting threads spin, docs/benchmarks.md "Two
    torch processes on one machine"). A count set on the command line or in a config stays."""
    from fedmsk.config import override_key
    from fedmsk.threads import parse_num_threads

    keys = {override_key(item) for item in [*overrides, *resources]}
    if "train.num_threads" in keys or parse_num_threads(cfg.train.num_threads) is not None:
        return []
    cpus = max(1, int(float(cfg.federation.client_num_cpus)))
    return [f"train.num_threads={cpus}"]


def _simulated_loader_workers(cfg: Any, overrides: list[str], resources: list[str]) -> list[str]:
    """Every simulated site shares this machine, so ``data.num_workers=auto`` counts the cores
    the engine gives one site (``federation.client_num_cpus``), not the machine's: twelve sites
    training at once must not each start a worker per core."""
    from fedmsk.config import override_key
    from fedmsk.data.loader_settings import parse_num_workers, resolve_loader_settings
    from fedmsk.training import resolve_device

    keys = {override_key(item) for item in overrides}
    if "data.num_workers" in keys or parse_num_workers(cfg.data.num_workers) is not None:
        return []
    cpus = float(cfg.federation.client_num_cpus)
    for item in resources:
        key, _, value = item.partition("=")
        if key == "federation.client_num_cpus":
            cpus = float(value)
    device = resolve_device(cfg.train.device).type
    settings = resolve_loader_settings("auto", device, cores=max(1, int(cpus)))
    return [f"data.num_workers={settings.num_workers}"]


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Hydra-style multirun: ``key=a,b`` gives one job per value (cartesian product)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    choices: list[list[str]] = []
    for override in parsed:
        key = override.get_key_element()
        if override.is_sweep_override():
            values = list(override.sweep_string_iterator())
        else:
            values = [override.get_value_element_as_str()]
        choices.append([f"{key}={v}" for v in values])
    return [list(combo) for combo in itertools.product(*choices)] or [[]]


# -- commands ----------------------------------------------------------------------------------


def print_recipe(cfg: Any) -> None:
    """The optimizer recipe, the training augmentation and the input normalisation, at the
    start of a run: each decides its figures and differs between the default and the study
    protocols."""
    from fedmsk.config import describe_augmentation, describe_input, describe_recipe

    print(f"recipe: {describe_recipe(cfg)}", flush=True)
    print(f"augmentation: {describe_augmentation(cfg)}", flush=True)
    print(f"input normalisation: {describe_input(cfg)}", flush=True)


def print_busy_machine_warning(cfg: Any) -> None:
    """Say so when another fedmsk training shares this machine and this run takes several
    threads (:func:`fedmsk.threads.busy_machine_warning`)."""
    from fedmsk.threads import busy_machine_warning, other_fedmsk_trainings, training_threads

    threads = training_threads(cfg.train.num_threads)
    message = busy_machine_warning(threads, other_fedmsk_trainings() if threads > 1 else [])
    if message:
        print(f"warning: {message}", flush=True)


def simulate_once(overrides: list[str], report: bool = True) -> Path:
    from fedmsk.config import describe_round, sampled_privacy_note
    from fedmsk.models import model_label
    from fedmsk.pointing import POINTING_FILE
    from fedmsk.run_dir import ensure_not_in_use
    from fedmsk.simulation import SimulationPlan, run_simulation

    prepared = prepare(overrides)
    cfg = prepared.cfg
    run_dir = Path(cfg.run_dir)
    training = len([s for s in cfg.federation.sites if s not in cfg.federation.heldout_sites])
    print(
        f"federated run: {cfg.task.name}, {cfg.strategy.name}, {model_label(cfg.model)}, "
        f"{len(cfg.federation.sites)} sites ({', '.join(cfg.federation.heldout_sites)} held out), "
        f"{cfg.federation.num_rounds} rounds of {describe_round(cfg, training)} -> {run_dir}",
        flush=True,
    )
    print_recipe(cfg)
    print_busy_machine_warning(cfg)
    note = sampled_privacy_note(cfg, training)
    if note:
        print(f"note: {note}", flush=True)
    ensure_not_in_use(run_dir)  # fail here, not in the ServerApp's log, if a run still writes
    (run_dir / POINTING_FILE).unlink(missing_ok=True)  # written again for this run's model
    plan = SimulationPlan(cfg, prepared.overrides, prepared.num_sites, run_dir / "flower.log")
    print(
        f"starting Flower's simulation engine ({prepared.num_sites} site nodes; its log: "
        f"{plan.log_path}) ...",
        flush=True,
    )
    run_simulation(plan, progress=sys.stdout)
    print_final_results(run_dir)
    if cfg.study:
        _study_analysis(cfg, run_dir)
    if report:
        if cfg.evaluation.gradcam:
            _heldout_cam(cfg, run_dir)
        _report(run_dir)
    return run_dir


def print_final_results(run_dir: Path) -> None:
    """The final model on each held-out center (the external test), as a reader wants it."""
    from fedmsk.progress import format_auc
    from fedmsk.report_data import run_history, skipped_rounds, skipped_rounds_text
    from fedmsk.report_summary import training_loss_warnings

    results = json.loads((run_dir / "results.json").read_text())
    for alias, site in sorted(results.get("sites", {}).items()):
        summary = site.get("summary", {})
        if site.get("role") != "heldout":
            continue
        if summary.get("auc") is not None:
            score = format_auc(summary)
        elif summary.get("top1_accuracy") is not None:
            score = f"top-1 accuracy {summary['top1_accuracy']:.3f}"
        else:
            score = "no score (one class only?)"
        print(f"held-out center {alias}: {score}, n={site.get('n')}", flush=True)
    history = run_history(run_dir)
    run = results.get("run", {})
    skipped = skipped_rounds(history)
    if skipped:
        text = skipped_rounds_text(skipped, run.get("rounds"))
        print(f"warning: {text}: this model trained on fewer rounds than planned", flush=True)
    for line in training_loss_warnings(history, len(run.get("classes") or []), run.get("mode")):
        print(f"warning: {line}", flush=True)


def _study_analysis(cfg: Any, run_dir: Path) -> None:
    """The study's own analysis (configs/study/NAME.yaml, fedmsk/studies/NAME.py)."""
    from fedmsk.studies import run_study_analysis

    print(f"study analysis: {cfg.study} ...", flush=True)
    run_study_analysis(cfg, run_dir)
    print(f"study table: {run_dir / 'study_table.md'}", flush=True)


def _heldout_cam(cfg: Any, run_dir: Path) -> None:
    """Grad-CAM of the final model on the held-out center, drawn where its images are.

    In a simulation every site's images are on this machine; in deployment CAMs are made at
    each hospital by the same function and never sent anywhere.
    """
    import numpy as np

    from fedmsk.data.dataset import build_site_loaders
    from fedmsk.data.federation import load_federation
    from fedmsk.explain import cam_grid_by_outcome
    from fedmsk.models import model_from_config, set_arrays
    from fedmsk.pointing import score_site, write_pointing
    from fedmsk.report_summary import cam_method_name
    from fedmsk.site_runtime import all_images_loader

    federation = load_federation(Path(cfg.data.root))
    results = json.loads((run_dir / "results.json").read_text())
    model = model_from_config(cfg, initial_weights=False)
    with np.load(run_dir / "final_model.npz") as arrays:
        set_arrays(model, {k: arrays[k] for k in arrays.files})
    pointing = {}
    for alias in cfg.federation.heldout_sites:
        loaders = build_site_loaders(
            federation.site_dir(alias), cfg.task, cfg.data, cfg.train, seed=cfg.seed
        )
        loader = all_images_loader(loaders, cfg)
        if loader is None:
            continue
        scored = score_site(
            model,
            loader.dataset,
            federation.site_dir(alias),
            float(results["threshold"]["value"]),
            method=cfg.evaluation.cam_method,
        )
        if scored is not None:
            pointing[alias] = scored
            print(
                f"{cam_method_name(cfg.evaluation.cam_method)} on {alias}: peak on the finding in "
                f"{scored.hits} of {scored.n} correctly found images (chance {scored.chance:.2f})",
                flush=True,
            )
        cam_grid_by_outcome(
            model,
            loader,
            float(results["threshold"]["value"]),
            list(cfg.task.classes),
            per_group=cfg.evaluation.gradcam_images,
            out_path=run_dir / "figures" / f"cam_{alias}.png",
            method=cfg.evaluation.cam_method,
        )
    if pointing:
        write_pointing(run_dir, pointing)


def _report(run_dir: Path) -> None:
    from fedmsk.report import build_report

    paths = build_report(run_dir)
    print(f"report: {paths.html}", flush=True)


def run_simulate(args: argparse.Namespace) -> int:
    jobs = expand_sweep(args.overrides) if args.multirun else [args.overrides]
    for index, job in enumerate(jobs):
        if args.multirun:
            job = [*job, f"run_dir=multirun/{index}-" + "-".join(o.split("=")[-1] for o in job)]
        try:
            simulate_once(job, report=not args.no_report)
        except Exception as exc:  # noqa: BLE001 - one line for the user, details in the log
            print(f"fedmsk simulate: {exc}", file=sys.stderr)
            return 1
    return 0


def run_demo(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    overrides = [
        *DEMO_OVERRIDES,
        f"data.root={out / 'data'}/xray_fracture-${{data.synthetic_scale}}x"
        "-seed${data.synthetic_seed}",
        f"run_dir={out / 'run'}",
        *args.overrides,
    ]
    try:
        run_dir = simulate_once(overrides)
    except Exception as exc:  # noqa: BLE001
        print(f"fedmsk demo: {exc}", file=sys.stderr)
        return 1
    print(f"demo finished: open {run_dir / 'report.html'}")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from fedmsk.centralized import run_centralized
    from fedmsk.comparison import write_comparison

    try:
        base = prepare(args.overrides)
        cfg = base.cfg
        out = Path(args.out or f"runs/compare-{cfg.task.name}").resolve()
        runs: dict[str, Path] = {}
        pooled = prepare([*base.overrides, f"run_dir={out / 'pooled'}"]).cfg
        print("pooled training ...", flush=True)
        runs["pooled"] = run_centralized(pooled, "pooled", progress=sys.stdout)
        if pooled.study:
            _study_analysis(pooled, runs["pooled"])
        if not args.skip_local:
            for alias in cfg.federation.sites:
                if alias in cfg.federation.heldout_sites:
                    continue
                local = prepare([*base.overrides, f"run_dir={out / ('local-' + alias)}"]).cfg
                print(f"local-only training at {alias} ...", flush=True)
                runs[f"local:{alias}"] = run_centralized(local, "local", alias, progress=sys.stdout)
        for name in [s for s in args.strategies.split(",") if s]:
            print(f"federated {name} ...", flush=True)
            runs[name] = simulate_once(
                [*base.overrides, f"strategy={name}", f"run_dir={out / name}"], report=False
            )
        paths = write_comparison(out, runs)
        if cfg.study:
            from fedmsk.studies import write_study_comparison

            studied = {k: v for k, v in runs.items() if not k.startswith("local:")}
            print(f"study comparison: {write_study_comparison(out, studied)}", flush=True)
    except Exception as exc:  # noqa: BLE001
        print(f"fedmsk compare: {exc}", file=sys.stderr)
        return 1
    print(f"comparison table: {paths['markdown']}")
    return 0
