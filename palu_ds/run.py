"""Run a training job from the command line of a launch script (shared by train.py and finetune.py)."""

from __future__ import annotations

import logging
import sys
import warnings

from palu_ds.checkpoint import ResumeRefused
from palu_ds.cli_args import parser
from palu_ds.config import ConfigError, check_model_vocabulary, check_run_paths, load_run
from palu_ds.reference.key import CacheMismatch
from palu_ds.run_folder import OutputDirInUse


def setup_logging() -> None:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from palu_ds.dist import env_rank

    rank = env_rank()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[palu_ds r{rank}] %(message)s", stream=sys.stderr)


def launch_args(description: str, default_ds: str | None = None):
    """Logging set up and the launch script's arguments parsed; None (after the error) without ``--deepspeed``."""
    setup_logging()
    args = parser(description, default_ds).parse_args()
    if not args.deepspeed:
        print("error: --deepspeed ds_configs/<zero2|zero3|zero3_offload>.json is required", file=sys.stderr)
        return None
    return args


#: the entry-point group of in-training evaluators: palu_ds's setup.py registers ``palu_eval.trainer_evaluator``
#: as ``default``; another package may register its own (``[project.entry-points."palu_ds.evaluators"]``)
EVALUATORS = "palu_ds.evaluators"


def plugin_evaluator(cfg, name: str = "default"):
    """The in-training evaluator for ``cfg`` (None when no evaluation runs during training) from the installed
    plugin ``name`` of :data:`EVALUATORS` -- how ``python -m palu_ds.train`` gets one without the library importing
    the palu_eval package (DESIGN's layering). The plugin is a function ``cfg -> evaluator``
    (``palu_eval.trainer_evaluator``).
    None installed is a :class:`ConfigError` before any model loads."""
    if not cfg.eval.enabled:
        return None
    from importlib.metadata import entry_points

    found = {ep.name: ep for ep in entry_points(group=EVALUATORS)}
    if name not in found:
        raise ConfigError(f"eval.every / eval.epochs need an evaluator, but no {EVALUATORS} entry point named "
                          f"{name!r} is installed (found: {sorted(found) or 'none'}): install palu_ds with its "
                          "palu_eval package (pip install palu_ds, or pip install -e . in a checkout), run "
                          "launch/train.py from a checkout, or set eval.every=0 and eval.epochs=null")
    return found[name].load()(cfg)


def main(description: str, forced: list[str] = (), default_ds: str | None = None, hooks=None,
         evaluator_for=None) -> int:
    """Parse, check and resolve the config (errors before any model loads: exit 2), then set up, train, save the
    model and write summary.json. ``hooks``: palu_ds.engine.Hooks (tests inject faults through it).
    ``evaluator_for(cfg)``: the in-training evaluator (or None) for the engine, from the launch script
    (``palu_eval.trainer_evaluator``), so that the library does not import the palu_eval package."""
    args = launch_args(description, default_ds)
    if args is None:
        return 2
    try:
        run = load_run(args.config, list(args.overrides) + list(forced))  # parsed, validated, resolved once
        check_run_paths(run.cfg, args.deepspeed)
        check_model_vocabulary(run)
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
    trainer.summary()  # before cleanup, which closes the trackers (wandb gets the summary)
    trainer.cleanup()
    return 0
