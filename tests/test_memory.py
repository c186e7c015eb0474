"""The memory estimator: DeepSpeed's ZeRO formulas for the policy, plus the resident reference's share."""
from palu_ds.cli import main
from palu_ds.memory import plan


def test_plan_adds_the_reference_share_to_deepspeeds_estimate():
    P, h, V, gpus = 7e9, 4096, 32000, 8
    p = plan(P, h, V, gpus_per_node=gpus, stage=3, micro_batch=1, seq_len=100, K=10, k=10, sens_frac=0.5)
    largest = V * h
    assert p.policy_gpu == 4 * largest + int(18 * P / gpus)  # DeepSpeed: 18 bytes/param sharded + largest layer
    assert p.reference_gpu == 2 * int(P) // gpus + 2 * largest  # frozen 16-bit weights, sharded the same way
    assert p.logits_gpu == 100 * V * 4
    assert p.cache_batch_gpu == 50 * 10 * 4 + 50 * 10 * 8
    assert p.resident - p.precomputed == p.reference_gpu - p.cache_batch_gpu
    z2 = plan(P, h, V, gpus_per_node=gpus, stage=2)
    assert z2.reference_gpu == 2 * int(P)  # replicated under ZeRO-2


def test_cli_prints_a_table(capsys):
    assert main(["estimate-memory", "--params", "70e9", "--hidden", "8192", "--vocab", "128256", "--gpus", "64",
                 "--offload-optimizer"]) == 0
    out = capsys.readouterr().out
    assert "| custom |" in out and "64 GPUs" in out and "precomputed / resident" in out


def test_peak_memory_window_resets():
    """A 300 MB allocation before the reset does not count in the peak after it (Linux VmHWM reset)."""
    import numpy as np

    from palu_ds.monitor import peak_memory_bytes, reset_peak_memory

    a = np.ones(300_000_000 // 8)
    before = peak_memory_bytes()
    del a
    reset_peak_memory()
    after = peak_memory_bytes()
    assert before - after > 200 * 2 ** 20
