"""Reference precompute: ``deepspeed launch/precompute.py --deepspeed ds_configs/zero3.json --config RUN.yaml``
(also torchrun / single process; installed: ``deepspeed --module palu_ds.precompute ...``, ``python -m
palu_ds.precompute ...``). Takes the same config as the training run it serves and writes the cache that
run will read (reference.cache_dir, default <train.output_dir>/reference_cache); reuses a matching one."""
import json
import sys


def main() -> int:
    from palu_ds.config import ConfigError, check_model_vocabulary, check_run_paths, load_run
    from palu_ds.run import launch_args

    args = launch_args("palu_ds reference precompute")
    if args is None:
        return 2
    try:
        run = load_run(args.config, args.overrides)  # parsed, validated, resolved once
        check_run_paths(run.cfg, args.deepspeed)
        check_model_vocabulary(run)
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
