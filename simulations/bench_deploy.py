"""What a deployed round costs beyond the sites' own training: fedmsk against a bare Flower app.

One real deployment on 127.0.0.1, built from ``fedmsk provision`` kits as a coordinator would:
a SuperLink with TLS and node authentication, three SuperNodes (two training sites and the
held-out center). On it, side by side and alternating, run

- fedmsk's app (``flwr run`` of this repository, FedAvg, the default slim ResNet-18), and
- ``simulations/bare_message_app``: Flower's Message API with the same model, the same arrays
  on the wire and the same local steps on random images, and nothing of fedmsk (no Hydra
  configuration, no site data, no checks), polling for replies promptly as fedmsk does; once
  with one array per tensor (as Flower's examples send a model) and once with the model packed
  into one buffer (fedmsk/wire.py's reason); ``--flower-poll`` adds a run with Flower's own
  ``send_and_receive`` (which polls every 3 s).

A round's overhead is its wall time minus the slowest site's compute (``train-seconds``: the
optimizer steps; both apps train two sites at once). fedmsk's round time is when its ServerApp
wrote the round's rows to metrics.jsonl (time-stamped as they appear); rounds after the first
are used (the first also carries site discovery). Issue 16's target: fedmsk's overhead at most
1.2x the bare app's.

    .venv/bin/python simulations/bench_deploy.py --out runs/bench_deploy
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the deployment test's process and port helpers
sys.path.insert(0, str(REPO / "simulations"))

from benchmark import RunWatcher  # noqa: E402
from deploy_helpers import (  # noqa: E402
    ProcessSet,
    deployment_env,
    free_ports,
    log_matches,
    tls_ready,
    toml_string,
    wait_until,
)

BARE_APP = REPO / "simulations" / "bare_message_app"
SITES = ["site00", "site01", "site02"]
HELDOUT = "site02"
TRAINING = 2
TARGET = 1.2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_deploy"))
    parser.add_argument("--rounds", type=int, default=5, help="rounds per run (first not used)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each app, alternating")
    parser.add_argument("--steps", type=int, default=4, help="local optimizer steps per round")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--flower-poll",
        action="store_true",
        help="also run the bare app with Flower's own send_and_receive (polls every 3 s)",
    )
    return parser.parse_args(argv)


class Federation:
    """The SuperLink and the three SuperNodes, started from provisioned kits."""

    def __init__(self, work: Path) -> None:
        from fedmsk.data.synthetic import generate_federation
        from fedmsk.provision import provision, write_node_config

        self.work = work
        self.fed_root = work / "fed"
        if not (self.fed_root / "federation.json").is_file():
            generate_federation(self.fed_root, task="xray_fracture", centers=3, seed=5, scale=0.5)
        port, *node_ports = free_ports(1 + len(SITES))
        self.kits = provision(
            work / "provision", SITES, server_name="localhost", bind_host="127.0.0.1", port=port
        )
        self.procs = ProcessSet(work / "logs")
        self.env = deployment_env(self.kits.coordinator.flwr_home)
        coordinator = self.kits.coordinator
        superlink = self.procs.start(
            "superlink",
            coordinator.superlink_command,
            deployment_env(work / "homes" / "superlink"),
            coordinator.dir,
        )
        wait_until(
            lambda: superlink.exited() or tls_ready(port, self.kits.ca_cert, "localhost"),
            90,
            "the SuperLink answering TLS",
            self.procs.report,
        )
        code, output = self.procs.run(
            "register", ["sh", str(coordinator.register_script)], self.env, coordinator.dir, 120
        )
        if code != 0:
            raise RuntimeError(f"registering the sites failed (exit {code}):\n{output[-2000:]}")
        self.registry = (coordinator.dir / "supernodes" / "node-ids.txt").resolve()
        nodes = []
        for site, node_port in zip(SITES, node_ports, strict=True):
            kit = self.kits.sites[site]
            write_node_config(kit, (self.fed_root / site).resolve(), "cpu")
            argv = list(kit.command)
            argv[argv.index("--port") + 1] = str(node_port)
            nodes.append(
                self.procs.start(site, argv, deployment_env(work / "homes" / site), kit.dir)
            )
        wait_until(
            lambda: all(log_matches(n, r"SuperNode ID") for n in nodes),
            120,
            "every SuperNode connecting",
            self.procs.report,
        )

    def flwr_run(self, name: str, app: Path, run_config: str, timeout: float) -> None:
        argv = ["flwr", "run", str(app), "fedmsk", "--run-config", run_config, "--stream"]
        code, output = self.procs.run(name, argv, self.env, self.work, timeout)
        if code != 0:
            raise RuntimeError(f"flwr run of {app.name} failed (exit {code}):\n{output[-3000:]}")

    def close(self) -> None:
        self.procs.stop_all()


def fedmsk_run(fed: Federation, args: argparse.Namespace, index: int) -> list[dict[str, Any]]:
    run_dir = (fed.work / f"fedmsk-{index}").resolve()
    overrides = [
        f"data.root={fed.fed_root.resolve()}",
        "data.synthetic=false",
        "federation=small",
        "strategy=fedavg",
        f"federation.num_rounds={args.rounds}",
        "model=resnet18_slim",
        f"data.image_size={args.image_size}",
        f"train.batch_size={args.batch_size}",
        f"train.local_steps={args.steps}",
        "train.num_threads=1",
        f"run_dir={run_dir}",
        f"federation.sites=[{','.join(SITES)}]",
        f"federation.heldout_sites=[{HELDOUT}]",
        f"federation.node_registry={fed.registry}",
        f"evaluation.every_rounds={args.rounds}",
        "evaluation.heldout_each_round=false",
        "evaluation.gradcam=false",
    ]
    run_config = fed.work / f"fedmsk-{index}.toml"
    run_config.write_text(f"fedmsk-overrides = {toml_string(json.dumps(overrides))}\n")
    run_dir.mkdir(parents=True, exist_ok=True)
    with RunWatcher(run_dir / "metrics.jsonl", interval=0.05) as watcher:
        fed.flwr_run(f"flwr-run-fedmsk-{index}", REPO, str(run_config), 1800)
    arrivals: dict[int, float] = {}
    compute: dict[int, list[float]] = {}
    for stamp, row in watcher.lines:
        if row.get("phase") == "train" and row.get("site") and "train-seconds" in row:
            arrivals.setdefault(int(row["round"]), stamp)
            compute.setdefault(int(row["round"]), []).append(float(row["train-seconds"]))
    rounds = []
    for r in sorted(arrivals)[1:]:
        if r - 1 in arrivals:
            rounds.append(
                {"round": r, "wall": arrivals[r] - arrivals[r - 1], "compute": compute[r]}
            )
    if len(rounds) != args.rounds - 1 or any(len(r["compute"]) != TRAINING for r in rounds):
        raise RuntimeError(
            f"{run_dir}: expected {args.rounds - 1} timed rounds of {TRAINING} sites"
        )
    return rounds


def bare_run(
    fed: Federation, args: argparse.Namespace, index: int, poll: str, pack: bool = False
) -> list[dict[str, Any]]:
    out = (fed.work / f"bare-{poll}{'-packed' if pack else ''}-{index}.json").resolve()
    out.unlink(missing_ok=True)
    settings = {
        "rounds": args.rounds,
        "nodes": TRAINING,
        "steps": args.steps,
        "batch-size": args.batch_size,
        "image-size": args.image_size,
        "poll": f'"{poll}"',
        "pack": str(pack).lower(),
        "out": f'"{out}"',
    }
    run_config = " ".join(f"{k}={v}" for k, v in settings.items())
    fed.flwr_run(f"flwr-run-{out.stem}", BARE_APP, run_config, 900)
    rounds = json.loads(out.read_text())["rounds"]
    return rounds[1:]  # like fedmsk's: rounds after the first


def overhead(rounds: list[dict[str, Any]]) -> dict[str, float]:
    walls = [r["wall"] for r in rounds]
    computes = [max(r["compute"]) for r in rounds]
    over = [w - c for w, c in zip(walls, computes, strict=True)]
    return {
        "rounds": len(rounds),
        "wall_median_s": statistics.median(walls),
        "compute_median_s": statistics.median(computes),
        "overhead_median_s": statistics.median(over),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    work.mkdir(exist_ok=True)
    apps = ["fedmsk", "bare-prompt", "bare-prompt-packed"]
    if args.flower_poll:
        apps.append("bare-flower")
    collected: dict[str, list[dict[str, Any]]] = {name: [] for name in apps}
    fed = Federation(work)
    try:
        for rep in range(args.repeats):
            for name in apps if rep % 2 == 0 else apps[::-1]:
                print(f"# run {rep + 1}/{args.repeats}: {name}", flush=True)
                if name == "fedmsk":
                    collected[name] += fedmsk_run(fed, args, rep)
                else:
                    poll = name.split("-")[1]
                    collected[name] += bare_run(fed, args, rep, poll, name.endswith("-packed"))
    finally:
        fed.close()
    summary = {name: overhead(rounds) for name, rounds in collected.items()}
    fedmsk = summary["fedmsk"]["overhead_median_s"]
    ratio = fedmsk / summary["bare-prompt"]["overhead_median_s"]
    ratio_packed = fedmsk / summary["bare-prompt-packed"]["overhead_median_s"]
    result = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "command": " ".join(["simulations/bench_deploy.py", *(argv or sys.argv[1:])]),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "summary": summary,
        "ratio_vs_bare_prompt": ratio,
        "ratio_vs_bare_packed": ratio_packed,
        "target": f"<= {TARGET}",
        "rounds": collected,
    }
    (out / "bench_deploy.json").write_text(json.dumps(result, indent=2))
    lines = [
        "| app | timed rounds | round wall (median) | slowest site's compute | overhead |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, s in summary.items():
        lines.append(
            f"| {name} | {s['rounds']} | {s['wall_median_s']:.2f} s | "
            f"{s['compute_median_s']:.2f} s | {s['overhead_median_s']:.2f} s |"
        )
    status = "met" if ratio <= TARGET else "MISSED"
    lines.append("")
    lines.append(
        f"fedmsk overhead / bare app's: {ratio:.2f} against the prompt-polling bare app "
        f"(one array per tensor, as Flower's examples send a model; target <= {TARGET}: "
        f"{status}); {ratio_packed:.2f} against the same app sending one packed buffer"
    )
    (out / "bench_deploy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
