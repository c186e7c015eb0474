"""The command line shared by the launch scripts: ``--config FILE --deepspeed DS.json [key.path=value ...]``."""

from __future__ import annotations

import argparse


def parser(description: str, deepspeed_default: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", help="run config YAML (launch/configs/*.yaml)")
    p.add_argument("--deepspeed", default=deepspeed_default, help="DeepSpeed JSON config (ds_configs/*.json)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-5 method.name=npo")
    return p
