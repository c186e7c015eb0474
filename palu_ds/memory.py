"""Per-GPU memory plan for an unlearning run, with and without a resident reference model.

Policy model states come from DeepSpeed's own estimators (``estimate_zero3_model_states_mem_needs`` /
``estimate_zero2_model_states_mem_needs``: 16-bit params and grads, fp32 master weights and Adam moments, sharded
over the GPUs, plus the largest layer gathered under ZeRO-3). A resident reference adds its frozen 16-bit weights
(ZeRO-3 sharded like the policy: ``2·P / gpus`` + the gathered largest layer; replicated under ZeRO-2: ``2·P``)
and its logits for a micro-batch (``B·T·V`` fp32, as log-softmax upcasts). The precomputed cache adds only the
batch's top-K ids at I_init and top-k log-probs at common positions. Activations are not modelled (they are the
same in both modes); the logits of the policy are shown for scale.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1 << 30

# (params, hidden, vocab) of common Llama shapes
PRESETS = {
    "llama2-7b": (6.74e9, 4096, 32000), "llama2-13b": (13.0e9, 5120, 32000), "llama2-70b": (69.0e9, 8192, 32000),
    "llama3-8b": (8.03e9, 4096, 128256), "llama3-70b": (70.6e9, 8192, 128256), "llama3.2-1b": (1.24e9, 2048, 128256),
}


@dataclass
class Plan:
    policy_gpu: int
    policy_cpu: int
    reference_gpu: int
    logits_gpu: int
    cache_batch_gpu: int

    @property
    def precomputed(self) -> int:
        return self.policy_gpu + self.logits_gpu + self.cache_batch_gpu

    @property
    def resident(self) -> int:
        return self.policy_gpu + self.logits_gpu + self.reference_gpu


def plan(params: float, hidden: int, vocab: int, gpus_per_node: int, nodes: int = 1, stage: int = 3,
         offload_optimizer: bool = False, offload_params: bool = False, micro_batch: int = 4, seq_len: int = 512,
         K: int = 5000, k: int = 256, sens_frac: float = 0.1) -> Plan:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    P, gpus = int(params), gpus_per_node * nodes
    largest = vocab * hidden  # embedding / lm_head dominate Llama's layers
    if stage == 3:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(P, largest, gpus_per_node, nodes, offload_optimizer,
                                                            offload_params, True, 1.0)
        ref = 2 * P // gpus + 2 * largest
    else:
        cpu, gpu = estimate_zero2_model_states_mem_needs(P, gpus_per_node, nodes, offload_optimizer, 1.0)
        ref = 2 * P
    tokens = micro_batch * seq_len
    logits = tokens * vocab * 4
    cache = int(tokens * sens_frac) * K * 4 + int(tokens * (1 - sens_frac)) * k * (4 + 4)
    return Plan(gpu, cpu, ref, logits, cache)


def table(rows: list[tuple[str, Plan]]) -> str:
    head = ("| model | policy states / GPU | + resident reference | + precomputed cache | precomputed / resident |\n"
            "|---|---|---|---|---|")
    lines = [head]
    for name, p in rows:
        lines.append(f"| {name} | {p.policy_gpu / GiB:.1f} GiB | {p.resident / GiB:.1f} GiB | "
                     f"{p.precomputed / GiB:.1f} GiB | {p.precomputed / p.resident:.2f}× |")
    return "\n".join(lines)
