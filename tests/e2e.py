"""Helpers for the end-to-end tests: run the real launch scripts (deepspeed launcher, 2 ranks, gloo, fp32 on CPU).
The CPU environment, free port and launcher command are palu_ds.localrun's (re-exported here for the tests)."""
import contextlib
import glob
import json
import os
import subprocess
import sys

from palu_ds.localrun import cpu_env, free_port, launcher_cmd, shm_buffers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
__all__ = ["ROOT", "cpu_env", "free_port", "launch", "summary", "answer_nll", "state", "wandb_run", "folder_held"]


def launch(script: str, args: list[str], nproc: int = 2, env: dict | None = None, timeout: int = 600,
           check: bool = True) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus N script args`` (N > 1) or ``python script args`` (one process)."""
    port = free_port()
    cmd = launcher_cmd(script, args, nproc, port)
    p = subprocess.run(cmd, cwd=ROOT, env=cpu_env(**(env or {})), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\n--- stdout\n{p.stdout[-6000:]}\n"
                             f"--- stderr\n{p.stderr[-6000:]}")
    leaked = shm_buffers(port)
    assert not leaked, f"{' '.join(cmd)} left DeepSpeed's shm all-reduce buffers behind: {leaked}"
    return p


@contextlib.contextmanager
def folder_held(out: str):
    """Another process holds ``out``'s run lock (palu_ds.run_folder.OutputLock) while the block runs; yields its pid.
    Killed afterwards: the kernel drops its flock, as for a crashed run."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; from palu_ds.run_folder import OutputLock; "
                               f"OutputLock({out!r}).acquire(); print('held', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


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


def wandb_run(out_dir: str) -> dict:
    """What an offline wandb run of ``<out_dir>/wandb`` recorded, read back from its ``run-*.wandb`` file (a LevelDB-
    style log of wandb's protobuf records: 7-byte header, 32 KiB blocks, each record ``crc32 | length | kind`` +
    payload, kind 1 = whole, 2/3/4 = first/middle/last piece): ``{"config": {...}, "history": [{...}, ...],
    "summary": {...}}`` with values decoded from their JSON."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    runs = glob.glob(os.path.join(out_dir, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(runs) == 1, f"expected one offline wandb run under {out_dir}/wandb, found {runs}"
    data = open(runs[0], "rb").read()
    assert data[:4] == b":W&B", data[:8]
    pos, block, piece = 7, 32768, b""
    out = {"config": {}, "history": [], "summary": {}}

    def items(updates):
        return {u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in updates}

    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # a block's zero-filled trailer
            pos += left
            continue
        piece += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(piece)
            piece, which = b"", rec.WhichOneof("record_type")
            if which == "run":
                out["config"].update(items(rec.run.config.update))
            elif which == "config":
                out["config"].update(items(rec.config.update))
            elif which == "history":
                out["history"].append(items(rec.history.item))
            elif which == "summary":
                out["summary"].update(items(rec.summary.update))
    return out


# launch/train.py with a fault injected through palu_ds.engine.Hooks (tests only): launch(FAULTY, [FAULT, *args])
FAULTY = "tests/faulty_train.py"
