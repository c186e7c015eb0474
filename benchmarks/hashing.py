"""What the full-content integrity checks cost (issue 18): sha256 of every byte of a weight file, the identity-cached
lookup every later run pays, and what that makes for a 70B model, its reference cache and its checkpoints.

    python benchmarks/hashing.py [--model /tmp/smol/hf] [--mib 1024]

Hashes a real model folder when given (the file is read twice: the first pass may come from disk, the second from
the page cache) and a generated file of ``--mib`` MiB; prints JSON. Extrapolations: 70B parameters in bf16 = 140 GB
of weights; a ZeRO checkpoint of it with fp32 Adam = 16 bytes/parameter = 1.12 TB, split over the ranks that each
hash their own files.
"""
import argparse
import glob
import json
import os
import platform
import sys
import tempfile
import time


def rate(fn, path) -> tuple[float, float]:
    t = time.perf_counter()
    fn(path)
    dt = time.perf_counter() - t
    return os.path.getsize(path) / dt / 1e6, dt


def _seconds(digest, files) -> float:
    """Seconds ``digest`` takes over every file."""
    t = time.perf_counter()
    for f in files:
        digest(f)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="an HF model folder (its *.safetensors are hashed)")
    ap.add_argument("--mib", type=int, default=1024)
    args = ap.parse_args()
    from palu_ds.integrity import cached_file_digest, file_digest

    out = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "algorithm": "sha256"}
    with tempfile.TemporaryDirectory() as d:
        os.environ["PALU_DS_CACHE"] = d
        big = os.path.join(d, "blob.bin")
        with open(big, "wb") as f:
            for _ in range(args.mib // 64):
                f.write(os.urandom(64 << 20))
        mbps, _ = rate(file_digest, big)
        out["generated_file"] = {"MiB": args.mib, "MB_per_s": round(mbps)}
        if args.model:
            files = sorted(glob.glob(os.path.join(args.model, "*.safetensors")))
            size = sum(os.path.getsize(f) for f in files)
            first, second, cached = (_seconds(fn, files) for fn in (file_digest, cached_file_digest,
                                                                     cached_file_digest))
            out["model"] = {"path": args.model, "bytes": size, "first_read_MB_per_s": round(size / first / 1e6),
                            "cached_run_MB_per_s": round(size / second / 1e6), "identity_hit_s": round(cached, 6)}
            mbps = size / second / 1e6
    out["extrapolated_70B"] = {
        "weights_140GB_first_run_s": round(140e9 / (mbps * 1e6)),
        "weights_later_runs_s": "a stat per file (identity cache)",
        "checkpoint_1.12TB_per_rank_s_at_64_ranks": round(1.12e12 / 64 / (mbps * 1e6)),
    }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
