"""`actdistill bench-distill`: stage-2 training throughput (samples/s) and peak RSS with 1 and N
data-parallel processes, on generated demonstrations and an untrained teacher of a given size.

Each process count is a separate `torchrun` run of the real `actdistill distill`; figures come
from the run's own log (timed after two warm-up steps).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from actdistill_ros.data.synthetic import write_synthetic_demos
from actdistill_ros.policies.vla import VLAConfig
from actdistill_ros.policy import create_untrained_policy


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench-distill", help="stage-2 samples/s and peak RSS, 1 and N processes")
    p.add_argument("--size", default="bench", choices=["tiny", "default", "bench"])
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=12, help="stage-2 steps per run (2 of them warm-up)")
    p.add_argument("--batch-size", type=int, default=32, help="global batch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: argparse.Namespace) -> int:
    config = VLAConfig.sized(args.size)
    results = []
    with tempfile.TemporaryDirectory(prefix="actdistill-bench-distill-") as tmp:
        tmp = Path(tmp)
        demos = write_synthetic_demos(tmp / "demos", episodes=16, length=24, size=config.image_size)
        teacher = create_untrained_policy(tmp / "teacher", size=args.size, student=False)
        for processes in args.processes:
            out = tmp / f"run{processes}"
            env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // processes)),
                       GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node",
                   str(processes), "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
                   "-m", "actdistill_ros.cli", "distill", "--teacher", str(teacher), "--data", str(demos),
                   "--out", str(out), "--probe-steps", "1", "--distill-steps", str(args.steps),
                   "--batch-size", str(args.batch_size), "--teacher-targets", "on_the_fly",
                   "--device", args.device]
            subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
            final = next(r for r in rows if r["stage"] == "distill" and "samples_per_s" in r)
            results.append({"processes": processes, "samples_per_s": round(final["samples_per_s"], 2),
                            "peak_rss_mb_per_process": round(final["peak_rss_mb_per_process"], 1),
                            "peak_rss_mb_total": round(final["peak_rss_mb_total"], 1)})
    summary = {"size": args.size, "device": args.device, "global_batch": args.batch_size,
               "num_layers": config.num_layers, "width": config.width, "tokens": config.num_tokens,
               "runs": results}
    if args.json:
        print(json.dumps(summary))
    else:
        for r in results:
            print(f"{r['processes']} process(es): {r['samples_per_s']:.1f} samples/s, peak RSS "
                  f"{r['peak_rss_mb_per_process']:.0f} MiB per process ({r['peak_rss_mb_total']:.0f} MiB total)")
    return 0
