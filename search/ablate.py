"""`iterhead ablate`: a trial's checkpoint, each seed in it evaluated under the attention
interventions of `trainable.ablation`, as a table. Any file that is not a checkpoint this
curriculum fits is one line (exit 2), never a traceback or a table of weights nobody trained."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from iterhead.curricula.errors import EXIT_OK, ConfigError


def cmd_ablate(args: argparse.Namespace) -> int:
    from iterhead.trainable import checkpoint

    path = Path(args.checkpoint)
    try:
        found = (path / checkpoint.FILENAME).is_file()
    except OSError as err:  # a name past the file system's limit, a symlink loop
        raise ConfigError(f"cannot read {path} ({err.strerror or err})", field="--checkpoint") from None
    if not found:  # a trial's folder (Tune's), given for the checkpoint folders it holds, is the likely slip
        inside = sorted(path.glob(f"checkpoint_*/{checkpoint.FILENAME}")) if path.is_dir() else []
        raise ConfigError(f"no {checkpoint.FILENAME} in {path}; " + (
            f"give one of its checkpoint folders, the newest: {inside[-1].parent}" if inside
            else "give a trial's checkpoint folder"), field="--checkpoint")
    from iterhead.curricula.io import parse_curriculum
    from iterhead.trainable.ablation import ablate, not_applicable
    from iterhead.trainable.devices import prepare_env, resolve_device
    from iterhead.trainable.loop import Trainer

    prepare_env()  # before training starts in this process
    try:
        device = resolve_device(args.device)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(str(err), field="--device") from None
    file = path / checkpoint.FILENAME
    states = _load_checkpoint(file, device)
    curricula = [parse_curriculum(s["curriculum"], file=str(file)) for s in states]
    seeds = [cur.seed for cur in curricula]
    if args.seed is not None:
        if args.seed not in seeds:
            raise ConfigError(f"this checkpoint holds seed(s) {', '.join(map(str, seeds))}, not {args.seed}",
                              field="--seed")
        states, curricula = [states[seeds.index(args.seed)]], [curricula[seeds.index(args.seed)]]
    for cur, one in zip(curricula, states):
        if not cur.data.cot:
            raise ConfigError("the interventions need chain-of-thought sequences (data.cot: true)",
                              field="--checkpoint")
        trainer = Trainer(cur, device)
        try:  # the weights and counters must fit the model its curriculum builds
            trainer.load_state_dict(one)
        except (RuntimeError, TypeError, ValueError, KeyError) as err:
            why = f"seed {cur.seed}'s state does not fit its curriculum: {type(err).__name__}"
            raise _unreadable(file, why) from None
        table = ablate(trainer)
        tasks = list(table["none"])
        print(f"seed {cur.seed}\nintervention        " + "  ".join(f"{t:>16}" for t in tasks))
        for name in table:
            print(f"{name:<20}" + "  ".join(f"{table[name][t]:>16.1%}" for t in tasks))
        skipped = not_applicable(cur.model.n_layers)
        if skipped:
            print(f"not run: {', '.join(skipped)} (they rewrite a layer this {cur.model.n_layers}-layer model lacks)")
    return EXIT_OK


def _load_checkpoint(file: Path, device: Any) -> list[dict[str, Any]]:
    """The trainer states in `file`; `ConfigError` for a file that is not a checkpoint (garbage,
    cut short, another program's, bytes changed since it was written) rather than a traceback."""
    from iterhead.trainable import checkpoint

    try:
        loaded = checkpoint.read(file, device)
    except checkpoint.Corrupt as err:
        raise _unreadable(file, err.why) from None
    except Exception as err:  # a foreign file trips torch.load's parser in many ways (IndexError, struct.error ...)
        raise _unreadable(file, f"torch.load: {type(err).__name__}") from None
    try:
        return checkpoint.trainer_states(loaded)
    except ValueError as err:
        raise _unreadable(file, str(err)) from None


def _unreadable(file: Path, why: str) -> ConfigError:
    return ConfigError(f"{file} is not a readable checkpoint ({why}); give a trial's checkpoint folder",
                       field="--checkpoint")
