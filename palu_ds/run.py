"""Run a training job from the command line of a launch script (shared by train.py and finetune.py)."""

from __future__ import annotations

import logging
import os
import sys
import warnings

from palu_ds.atomic import write_json
from palu_ds.cli_args import parser
from palu_ds.config import ConfigError, check_model_vocabulary, check_run_paths, load_config


def setup_logging() -> None:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from palu_ds.dist import env_rank

    rank = env_rank()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[palu_ds r{rank}] %(message)s", stream=sys.stderr)


def main(description: str, forced: list[str] = (), default_ds: str | None = None, evaluator_for=None) -> int:
    """``evaluator_for(cfg)``: the in-training evaluator (or None) for the engine, from the launch script
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
        evaluator = evaluator_for(cfg) if evaluator_for else None
    except (ConfigError, FileNotFoundError) as e:  # before any model is loaded
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from palu_ds.engine import Trainer
    from palu_ds.methods import get_method

    trainer = Trainer(cfg, args.deepspeed, get_method(cfg.method.name), evaluator)
    trainer.setup()
    last = trainer.train()
    from palu_ds import dist
    from palu_ds.monitor import peak_memory_bytes

    peaks = [peak_memory_bytes()]  # of the training steps, per rank (before the final save)
    if dist.world() > 1:
        import torch.distributed as tdist

        peaks = [None] * dist.world()
        tdist.all_gather_object(peaks, peak_memory_bytes())
    out = trainer.save_model()
    trainer.cleanup()
    if trainer.rank == 0:
        write_json(os.path.join(cfg.train.output_dir, "summary.json"),
                      {"steps": trainer.step, "first": trainer.first_scalars, "last": last, "model": out,
                       "skipped_steps": trainer.skipped, "world_size": dist.world(),
                       "peak_memory_bytes_per_rank": peaks, "spans": trainer.span_info,
                       "step_seconds": [round(t, 5) for t, _ in trainer.step_times],
                       "step_tokens": [n for _, n in trainer.step_times]})
        logging.getLogger("palu_ds").info(
            "done: %d steps, final %s; model: %s; tensorboard: %s", trainer.step,
            " ".join(f"{k}={v:.4g}" for k, v in last.items() if k.startswith(("loss/", "dual/"))), out,
            cfg.log.tensorboard_dir or os.path.join(cfg.train.output_dir, "tensorboard"))
    return 0
