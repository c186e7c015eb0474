"""Helpers for the end-to-end tests: run the real launch scripts (deepspeed launcher, 2 ranks, gloo, fp32 on CPU)."""
import glob
import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR",
                                                   os.path.join(os.path.dirname(sys.executable), "..",
                                                                "torch_extensions")))
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    env.update(extra)
    return env


def launch(script: str, args: list[str], nproc: int = 2, env: dict | None = None, timeout: int = 600,
           check: bool = True) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus N script args`` (N > 1) or ``python script args`` (one process)."""
    port = free_port()
    if nproc > 1:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port",
               str(port), script, *args]
    else:
        cmd = [sys.executable, script, *args]
    p = subprocess.run(cmd, cwd=ROOT, env=cpu_env(**(env or {})), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\n--- stdout\n{p.stdout[-6000:]}\n"
                             f"--- stderr\n{p.stderr[-6000:]}")
    leaked = glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
    assert not leaked, f"{' '.join(cmd)} left DeepSpeed's shm all-reduce buffers behind: {leaked}"
    return p


def summary(out_dir: str) -> dict:
    with open(os.path.join(out_dir, "summary.json")) as f:
        return json.load(f)


def answer_nll(model_dir: str, data_dir: str, config: str, n: int = 16) -> float:
    """Mean answer-token NLL of a saved model on the first n rows of a split (single process, no DeepSpeed)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from palu_ds.batch import shift
    from palu_ds.data import QADataset, collate

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ds = QADataset.from_source(data_dir, tok, config=config)
    batch = collate([ds[i] for i in range(min(n, len(ds)))], tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    lg, lb = shift(logits, batch["labels"])
    return float(torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), ignore_index=-100))


def state(model_dir: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(model_dir, "model.safetensors"))


# launch/train.py with a fault injected through palu_ds.engine.Hooks (tests only): launch(FAULTY, [FAULT, *args])
FAULTY = "tests/faulty_train.py"
