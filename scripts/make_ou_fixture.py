"""Write tests/fixtures/open_unlearning/: open-unlearning's TOFU logs of Llama-3.2-1B-Instruct (the target on
forget01 and the retain99 model; from ../shared/data/tofu_eval_logs, MIT), numbers kept as they are, the long
strings (chat prompts, generations) dropped except the forget answers; gzipped.  TOFU_SUMMARY.json files are copied
unchanged: they are open-unlearning's own aggregates that tests/test_open_unlearning.py reproduces.

    python scripts/make_ou_fixture.py [LOGS_DIR]
"""
import gzip
import json
import shutil
import sys
from pathlib import Path

from palu_ds.atomic import atomic_path

ROOT = Path(__file__).resolve().parents[1]
SRC = Path(sys.argv[1] if len(sys.argv) > 1 else "/work/shared/data/tofu_eval_logs")
OUT = ROOT / "tests" / "fixtures" / "open_unlearning"
RUNS = {"target_forget01": "tofu_Llama-3.2-1B-Instruct_full/evals_forget01",
        "retain99": "tofu_Llama-3.2-1B-Instruct_retain99"}


def strip(obj, metric=""):
    if isinstance(obj, dict):
        keep = {}
        for k, v in obj.items():
            if isinstance(v, str) and not (k == "ground_truth" and metric == "forget_Q_A_ROUGE"):
                continue
            keep[k] = strip(v, metric or k)
        return keep
    return obj


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for name, rel in RUNS.items():
        d = json.loads((SRC / rel / "TOFU_EVAL.json").read_text())
        with atomic_path(OUT / f"{name}_TOFU_EVAL.json.gz") as tmp, gzip.GzipFile(tmp, "wb", mtime=0) as f:
            f.write(json.dumps(strip(d)).encode())
        shutil.copyfile(SRC / rel / "TOFU_SUMMARY.json", OUT / f"{name}_TOFU_SUMMARY.json")
    print(sorted((p.name, p.stat().st_size) for p in OUT.iterdir()))


if __name__ == "__main__":
    main()
