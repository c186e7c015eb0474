"""The TOFU unlearning benchmark, one pipeline for every preset, through the real CLIs:

    python -m benchmarks.tofu --preset mini --out runs/mini_tofu/a0-40_f10_s0   # ~12 min on 2 quiet CPU cores
    python -m benchmarks.tofu --preset real --out runs/tofu_real                # ~61 min from scratch on 2 CPU cores
    python -m benchmarks.tofu --preset my_experiment.yaml --set sft.epochs=6    # a preset of your own
    python -m benchmarks.tofu --preset efficacy --out runs/efficacy             # issue 25's protocol, ~5.5 h

A preset (``presets/*.yaml``, schema in :mod:`.preset`) names the data, the base model, the split, the recipes, the
methods and their grid.  Stages (each a command run by :class:`palu_ds.stages.Stages`: timed, logged in ``OUT/logs``,
reused when its command, inputs and outputs are unchanged; ``--fresh`` redoes all):

1. data in ``OUT/data`` (:mod:`.data`);
2. the base model (a folder, ``palu-ds fetch-model``, or a tiny Llama in ``OUT/base``); the target and the retain
   model = SFT on their splits, cached in ``OUT/models/<name>-<sha256 of base, rows, recipe>``;
3. ``palu_eval/run.py`` of the retain model, the base (``eval.base``) and the target (forget quality = KS test
   against the retain model's forget truth ratios);
4. one learning rate per ``Method.family``: the preset's table (``lr.table``), else ``lr.value`` or the SFT lr;
5. every run (:mod:`.specs`, from the registry): its reference cache (shared per reference key), ``launch/train.py``
   and its evaluation;
6. with ``eval.position_nll``: answer NLL by position kind on PALU's labelled forget set;
7. ``OUT/<report>.md`` (tables), ``.json`` (every number, the preset, stage seconds), ``.png`` (:mod:`.report`).
"""
