"""Reference precompute: ``deepspeed launch/precompute.py --deepspeed ds_configs/zero3.json --config RUN.yaml``
(also torchrun / single process). Takes the same config as the training run it serves and writes the cache that
run will read (reference.cache_dir, default <train.output_dir>/reference_cache); reuses a matching one."""
import json
import os
import sys


def main() -> int:
    from palu_ds.cli_args import parser
    from palu_ds.config import ConfigError, check_model_vocabulary, check_run_paths, load_config, resolve
    from palu_ds.run import setup_logging

    setup_logging()
    args = parser("palu_ds reference precompute").parse_args()
    if not args.deepspeed:
        print("error: --deepspeed ds_configs/<...>.json is required", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
        check_run_paths(cfg, args.deepspeed)
        check_model_vocabulary(cfg)
    except (ConfigError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    import time

    import deepspeed
    from transformers import AutoTokenizer

    from palu_ds import dist
    from palu_ds.data.build import build_datasets
    from palu_ds.ds_config import load_ds_config
    from palu_ds.reference import CacheMismatch, precompute

    run = resolve(cfg)
    cfg, method = run.cfg, run.method
    if not run.reference_parts:
        print(f"method {method.name} is reference-free: nothing to precompute", file=sys.stderr)
        return 0
    dist.init(cfg.train.timeout)
    on_cpu = deepspeed.get_accelerator().device_name() == "cpu"
    ds = load_ds_config(args.deepspeed, cfg.train, dist.world(), on_cpu)
    tok = AutoTokenizer.from_pretrained(run.tokenizer_path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    datasets = build_datasets(cfg.data, tok, method, cfg.train.seed)
    cache_dir = cfg.reference.cache_dir
    t = time.time()
    try:
        manifest = precompute(cfg, method, run.hp, datasets, tok, ds, cache_dir)
    except CacheMismatch as e:  # a cache made for another run (model revision, data, K, ...): named, not a crash
        print(f"error: {e}", file=sys.stderr)
        return 2
    if dist.is_main():
        print(json.dumps({"cache_dir": cache_dir, "seconds": round(time.time() - t, 2),
                          "shards": manifest["shards"], "retain_loss": manifest.get("retain_loss")}, indent=1))
    return 0


if __name__ == "__main__":
    from palu_ds.process import run_main

    run_main(main)
