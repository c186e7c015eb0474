"""Reference precompute: ``deepspeed launch/precompute.py --deepspeed ds_configs/zero3.json --config RUN.yaml``
(also torchrun / single process). Takes the same config as the training run it serves and writes the cache that
run will read (reference.cache_dir, default <train.output_dir>/reference_cache); reuses a matching one.
The same as ``python -m palu_ds.precompute`` (palu_ds/precompute.py)."""

from palu_ds.precompute import main
from palu_ds.process import run_main

if __name__ == "__main__":
    run_main(main)
