"""The `iterhead` command line. Exit codes: 0 success, 2 bad input, 1 a failure while running."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from iterhead.curricula.errors import ConfigError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="iterhead", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("validate", help="check curriculum and search files; exit 2 on the first bad one")
    v.add_argument("files", nargs="+", metavar="FILE")

    t = sub.add_parser("train", help="train one curriculum and log it to MLflow")
    t.add_argument("curriculum", metavar="CURRICULUM.yaml")
    t.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    t.add_argument("--experiment", help="MLflow experiment (default: the curriculum's name)")
    t.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: auto)")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p


def cmd_validate(args: argparse.Namespace) -> int:
    from iterhead.curricula.io import load_curriculum

    bad = 0
    for file in args.files:
        try:
            cur = load_curriculum(file)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            bad += 1
            continue
        print(f"ok: {file}: curriculum {cur.name!r}, {len(cur.tasks)} task(s), "
              f"{len(cur.stages)} stage(s), lengths {cur.data.min_len}..{cur.data.max_len}")
    return EXIT_BAD_INPUT if bad else EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    from iterhead.curricula.io import load_curriculum
    from iterhead.search.tracking import resolve_uri

    cur = load_curriculum(args.curriculum)
    uri = resolve_uri(args.tracking_uri)
    if args.threads is not None and args.threads < 1:
        raise ConfigError("must be at least 1", field="--threads")
    import torch

    from iterhead.search.train import train
    from iterhead.trainable.loop import resolve_device

    try:
        device = resolve_device(args.device)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(str(err), field="--device") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    train(cur, uri=uri, experiment=args.experiment or cur.name, device=device,
          source=str(Path(args.curriculum).resolve()))
    return EXIT_OK


COMMANDS = {"validate": cmd_validate, "train": cmd_train}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
