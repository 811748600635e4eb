"""`actdistill`: one command line for the offline and evaluation tools.

Each subcommand lives in its own module, which provides ``add_parser(subparsers)``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Imported lazily so that `actdistill --help` and ROS-free subcommands do not pay for (or need)
# the simulator or ROS.
SUBCOMMANDS = {
    "bench": "actdistill_ros.bench",
    "predict": "actdistill_ros.predict",
    "train-teacher": "actdistill_ros.distill.teacher_training",
    "make-backbone": "actdistill_ros.policies.hf_vla.tiny_backbone",
    "distill": "actdistill_ros.distill.distillation",
    "bench-distill": "actdistill_ros.distill.bench_distill",
    "collect": "actdistill_ros.sim.collect",
    "eval-sim": "actdistill_ros.sim.evaluate",
    "bench-node": "actdistill_ros.ros.bench_node",
    "soak": "actdistill_ros.ros.soak",
    "replay-eval": "actdistill_ros.ros.replay.cli",
    "demo": "actdistill_ros.demo",
    "dataset-info": "actdistill_ros.data.lerobot_dataset",
}
# A flag that hands a subcommand to another module's function: the in-process evaluator stays
# ROS-free, and the ROS layer runs `eval-sim --through-ros`.
MODE_FLAGS = {
    ("eval-sim", "through_ros"): "actdistill_ros.ros.closed_loop:run_eval_sim",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="actdistill", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in SUBCOMMANDS.values():
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def command_function(args: argparse.Namespace):
    """The function that runs the parsed command: its parser's default, unless a MODE_FLAGS flag is set."""
    for (command, flag), target in MODE_FLAGS.items():
        if args.command == command and getattr(args, flag, False):
            module_name, name = target.split(":")
            return getattr(importlib.import_module(module_name), name)
    return args.func


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(command_function(args)(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as err:
        # Bad input: one clear line, no traceback.
        print(f"actdistill {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
