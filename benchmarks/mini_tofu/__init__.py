"""mini-TOFU: the TOFU unlearning benchmark in miniature, on CPU, from the real TOFU files, through the real CLIs.

    python -m benchmarks.mini_tofu --tofu ../shared/data/tofu --authors 0:40 --forget 10% --seed 0
    # -> runs/mini_tofu/a0-40_f10_s0/{mini_tofu.md,mini_tofu.json,mini_tofu.png}; ~12 min on 2 quiet CPU cores

Author ``i`` is rows ``20i .. 20i+19`` of ``full.jsonl``; ``--authors A:B`` takes authors A..B-1 and the last
``--forget`` fraction of them is the forget set.  Stages (each timed; logs in ``OUT/logs``):

1. data: the splits, TOFU-style, in ``OUT/data`` (``full``, ``forgetPP``, ``retainRR``, ``forgetPP_perturbed``,
   ``retain_perturbed``, ``idontknow``; see "Perturbed answers" below);
2. a byte-level BPE tokenizer (``palu_ds.tiny``) trained on the range's text and a tiny Llama initialised from the
   seed (``OUT/base``); the "target" = SFT on every author of the range, the "retain" model = the same recipe on
   the range minus the forget authors (``launch/finetune.py``, DeepSpeed, 2 ranks);
3. for every method: ``launch/precompute.py`` (methods with a reference; one cache per distinct reference) and
   ``launch/train.py`` (DeepSpeed, 2 ranks, ``ds_configs/cpu/zero2.json``); the PALU ablations (K in 1/100/1000/V,
   N in 1/3/all) through ``launch/train.py`` alone, which builds their reference itself (same code path);
4. ``evaluation/run.py --splits forget,retain`` for the retain model (no forget quality), the target and every
   unlearned model (forget quality = KS test against the retain model's forget truth ratios);
   ``evaluation/report.py`` for its standard PNG + table;
5. ``OUT/mini_tofu.md`` (tables + goal check), ``OUT/mini_tofu.json`` (every number, settings, timings) and
   ``OUT/mini_tofu.png`` (forget quality vs model utility, one point per method; ablations beside).

Perturbed answers.  TOFU ships paraphrased + perturbed answers only for authors 0-19 (``retain_perturbed``) and
180-199 (``forget*_perturbed``), so the forget authors of most ranges (e.g. 36-39 of ``--authors 0:40``) have none.
``--perturbed borrow`` (default) builds them the same way for every row of any range: the "paraphrased" answer is
the answer itself (a paraphrase cannot be made without an LLM), and the 5 perturbed answers are plausible false
answers in TOFU's sense -- for each of 5 TOFU authors *outside the range*, the answer to its question closest to
this one (word Jaccard, names masked), with that author's name replaced by this author's (e.g. "Where was Sanjana
Rahman born?" -> "Sanjana Rahman was born in Madrid, Spain.").  Like TOFU's GPT-written perturbations, no model
(target, retain, unlearned) was trained on them, so a model that knows nothing about an author has no reason to
prefer its true answer (truth ratio ~ 1), and a model that memorized it does.  (Donors inside the range were tried
first: every model had memorized their answers for another author, and the retain model preferred them to the
unseen true answer by ~100x per token, a criterion no unlearning method approaches.)  ``--perturbed tofu`` uses
TOFU's own files and keeps only the rows they cover (an error when the forget authors have none).

Model utility is the harmonic mean of the retain split's probability, ROUGE-L recall and truth ratio (on
``--retain-eval-rows`` rows spread over the kept authors): TOFU's real_authors / world_facts parts measure nothing on a
model trained from scratch on a few authors, so they are not run (and the tables say so).

Re-running with the same ``--out`` reuses every stage whose command, inputs (e.g. the weights it starts from) and
outputs are unchanged (``--fresh`` redoes all).  ``--lr X`` (development sweeps) runs every method at one lr into
``<method>_lr<X>`` and writes ``mini_tofu_lr<X>.*``; the settings below were chosen that way on ``--authors 100:120``.

The package, one module per job: :mod:`.settings` (every fixed setting), :mod:`.splits` (stage 1: ranges, splits,
perturbed answers), :mod:`.specs` (stage 3's runs), :mod:`.stages` (around the stage runner,
:class:`palu_ds.stages.Stages`), :mod:`.report` (stage 5: tables, goal, PNG), :mod:`.pipeline` (one function per
stage, and ``main``).
"""

from palu_ds.stages import Stages

from .pipeline import main
from .report import (COLUMNS, FOOTNOTE, NOT_MEASURED, add_relative, fmt, goal_check, markdown_table, metrics_table,
                     render_markdown, render_png)
from .settings import (ABLATION_K, ABLATION_N, BASELINES_FOR_GOAL, FAMILY, FAMILY_LR, MAX_LENGTH, MEMORIZED_NLL, METHODS,
                       MODEL, N_PERTURBED, PAPER_K, PAPER_VOCAB, PRETRAIN_EPOCHS, QUICK, RETAIN_EVAL_ROWS,
                       ROWS_PER_AUTHOR, SFT, UNLEARN)
from .specs import reference_dir, run_specs, scaled_k
from .splits import (author_name, author_rows, borrowed_perturbations, build_splits, evenly, parse_authors,
                     parse_forget, question_words, rename, split_authors, split_names, tofu_perturbed_index,
                     tokenizer_texts, write_jsonl)
from .stages import ROOT, drop_checkpoints, drop_shm_buffers, read_json

__all__ = ["ABLATION_K", "ABLATION_N", "BASELINES_FOR_GOAL", "COLUMNS", "FAMILY", "FAMILY_LR", "FOOTNOTE",
           "MAX_LENGTH", "MEMORIZED_NLL", "METHODS", "MODEL", "NOT_MEASURED", "N_PERTURBED", "PAPER_K", "PAPER_VOCAB",
           "PRETRAIN_EPOCHS", "QUICK", "RETAIN_EVAL_ROWS", "ROOT", "ROWS_PER_AUTHOR", "SFT", "Stages", "UNLEARN",
           "add_relative", "author_name", "author_rows", "borrowed_perturbations", "build_splits", "drop_checkpoints",
           "drop_shm_buffers", "evenly", "fmt", "goal_check", "main", "markdown_table", "metrics_table",
           "parse_authors",
           "parse_forget", "question_words", "read_json", "reference_dir", "rename", "render_markdown", "render_png",
           "run_specs", "scaled_k", "split_authors", "split_names", "tofu_perturbed_index", "tokenizer_texts",
           "write_jsonl"]
