"""mini-TOFU's settings: the same for every author range and seed (chosen on a development range, not on the
reported one; see BENCHMARKS.md "## mini-TOFU")."""

from palu_ds.methods import METHODS as REGISTRY

ROWS_PER_AUTHOR = 20
N_PERTURBED = 5
METHODS = tuple(m.name for m in REGISTRY.values() if m.unlearning)  # every unlearning method of the registry
BASELINES_FOR_GOAL = ("grad_diff", "npo")

MODEL = {"vocab_size": 2048, "hidden": 128, "layers": 4, "heads": 4, "intermediate": 344, "max_positions": 512}
MAX_LENGTH = 192  # longest prompt + answer of TOFU with this tokenizer is ~150 tokens
SFT = {"lr": 3e-3, "epochs": 20, "batch_size": 8, "warmup_steps": 20, "scheduler": "cosine",
       "weight_decay": 0.0, "max_grad_norm": 1.0}
#: PALU's K is 5000 of Llama-2's 32000-token vocabulary in the paper: scaled to ours, K = round(5000 * V / 32000)
PAPER_VOCAB, PAPER_K = 32000, 5000
UNLEARN = {"batch_size": 8, "epochs": 10, "scheduler": "linear", "warmup_steps": 5, "weight_decay": 0.0,
           "max_grad_norm": 1.0}
#: one learning rate per method family, for every range: of {3e-4, 1e-3, 3e-3} on the development range 100:120 (not
#: a reported range), the lr with the highest geometric-mean forget quality of the family's methods among those whose
#: mean utility stays >= 0.9x the target's, else the lr with the highest mean utility (grad_ascent, which has no
#: retain term, follows grad_diff).  BENCHMARKS.md "## mini-TOFU" has the sweep.
FAMILY = {"palu": "entropy", "palu_pd": "entropy", "pd_flat": "entropy", "grad_ascent": "nll", "grad_diff": "nll",
          "npo": "preference", "simnpo": "preference", "idk_dpo": "preference"}
FAMILY_LR = {"entropy": 1e-3, "nll": 3e-4, "preference": 1e-3}
#: the ablations of PALU (the paper: K = 1 collapses, N = 3 saturates); "all" = V for K, whole spans for N
ABLATION_K = ("1", "100", "1000", "all")
ABLATION_N = ("1", "3", "all")
RETAIN_EVAL_ROWS = 200  # utility rows (TOFU: 400 of 3,600); the forget rows are all evaluated
MEMORIZED_NLL = 0.1  # the target/retain answer NLL at the end of SFT above which the script warns
#: --pretrain: epochs of the SFT recipe on the pre-training authors' QA (e.g. 140 authors = 2,800 rows)
PRETRAIN_EPOCHS = 8
QUICK = {"sft_epochs": 6, "unlearn_epochs": 2, "max_new_tokens": 24}
