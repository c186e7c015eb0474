"""Run a training job from the command line of a launch script (shared by train.py and finetune.py)."""

from __future__ import annotations

import logging
import sys
import warnings

from palu_ds.checkpoint import ResumeRefused
from palu_ds.cli_args import parser
from palu_ds.config import ConfigError, check_model_vocabulary, check_run_paths, load_config, resolve
from palu_ds.reference.key import CacheMismatch
from palu_ds.run_folder import OutputDirInUse


def setup_logging() -> None:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from palu_ds.dist import env_rank

    rank = env_rank()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[palu_ds r{rank}] %(message)s", stream=sys.stderr)


def main(description: str, forced: list[str] = (), default_ds: str | None = None, hooks=None,
         evaluator_for=None) -> int:
    """Parse, check and resolve the config (errors before any model loads: exit 2), then set up, train, save the
    model and write summary.json. ``hooks``: palu_ds.engine.Hooks (tests inject faults through it).
    ``evaluator_for(cfg)``: the in-training evaluator (or None) for the engine, from the launch script
    (``evaluation.trainer_evaluator``), so that the library does not import the evaluation package."""
    setup_logging()
    args = parser(description, default_ds).parse_args()
    if not args.deepspeed:
        print("error: --deepspeed ds_configs/<zero2|zero3|zero3_offload>.json is required", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, list(args.overrides) + list(forced))
        check_run_paths(cfg, args.deepspeed)
        check_model_vocabulary(cfg)
        run = resolve(cfg)
        evaluator = evaluator_for(run.cfg) if evaluator_for else None
    except (ConfigError, FileNotFoundError) as e:  # before any model is loaded
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from palu_ds.engine import Trainer

    trainer = Trainer(run, args.deepspeed, hooks, evaluator)
    try:
        trainer.setup()
    except ConfigError as e:  # the checkpoint to resume was trained with another config: every rank stops
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (OutputDirInUse, ResumeRefused, CacheMismatch) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    trainer.train()
    trainer.save_model()
    trainer.cleanup()
    trainer.summary()
    return 0
