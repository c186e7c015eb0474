"""The training loop: setup, train, checkpoint, resume, log -- for any method of the registry.

One optimizer step = ``grad_accum`` micro-batches per rank. Each micro-batch holds the batches the method names
("forget", and "retain" / "idk" when it needs them); they go through the model in ONE forward (concatenated), the
method turns logits (+ reference tensors) into named loss terms, and the objective is back-propagated.

Normalisation is global: before a step the token/sequence counts of the whole window on every rank are all-reduced
(one collective), each term is ``local_sum / global_count``, and the loss handed to DeepSpeed is multiplied by
``world × grad_accum`` to undo its gradient averaging -- so the update equals the one of a single process holding the
whole global batch, for any world size and accumulation. After backward, the term values, token count and a
non-finite flag are all-reduced once; rank-identical λ is updated from them (palu_ds.dual).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict

import torch

from palu_ds import checkpoint, dist, lm_head
from palu_ds.atomic import atomic_path
from palu_ds.batch import IGNORE_INDEX, PackedLogits, shift
from palu_ds.config import RunConfig
from palu_ds.data.build import build_datasets, report_spans
from palu_ds.data.collate import collate
from palu_ds.ds_config import load_ds_config, zero_stage
from palu_ds.monitor import Monitor, peak_memory_bytes, reset_peak_memory
from palu_ds.sampling import BatchStream

log = logging.getLogger("palu_ds")

COUNT_KEYS = ("answer", "sens", "common", "seqs")
# Fault injection for the tests (never set in normal runs): "crash_after=K" ends every rank right after optimizer
# step K (after any checkpoint of that step); "nan_from=K" makes the loss NaN from step K on; "stop_rank=R" SIGSTOPs
# rank R before optimizer step ``stop_at`` + 1 (default 3), a peer that hangs without dying; "crash_in_save_model=1"
# ends every rank when the final model is about to be written (after the final checkpoint).
FAULT = dict(kv.split("=") for kv in os.environ.get("PALU_DS_FAULT", "").split(",") if "=" in kv)


def batch_counts(batch: dict) -> torch.Tensor:
    """Counts of the (shifted) target positions of each kind and of sequences: the global normalisers."""
    _, labels, sens, common = shift(batch["input_ids"], batch["labels"], batch["sens_mask"], batch["common_mask"])
    answer = labels != IGNORE_INDEX
    return torch.tensor([answer.sum(), sens.sum(), common.sum(), (answer.sum(1) > 0).sum()], dtype=torch.float64)


def _accepts_logits_to_keep(model) -> bool:
    """Whether the (base) model's forward takes ``logits_to_keep`` (most transformers causal LMs do)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def _innermost_optimizer(engine):
    """The torch optimizer that holds Adam's state, under DeepSpeed's ZeRO / precision wrappers."""
    opt = engine.optimizer
    while getattr(opt, "optimizer", None) is not None and opt.optimizer is not opt:
        opt = opt.optimizer
    return opt


@contextmanager
def skipped_update(engine):
    """``engine.step()`` inside this block changes nothing the optimizer owns: the innermost optimizer's ``step``
    is a no-op, so the weights, Adam's moments and its step count stay as they were (setting lr=0 instead still
    counts the step and decays the moments). DeepSpeed's own skip -- a non-finite gradient norm under fp16 loss
    scaling (ZeRO, or the fp16 optimizer) -- never sees our non-finite steps, whose loss is replaced by a finite
    zero before backward so that every rank's collectives stay finite; the rest of DeepSpeed's step (gradient
    reduction, clearing, its counters) runs as usual."""
    inner = _innermost_optimizer(engine)
    own = vars(inner).get("step")  # an instance-level step (if any) to put back
    inner.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        if own is not None:
            inner.step = own
        else:
            del inner.step


class Preempted(SystemExit):
    """Raised after the preemption checkpoint; exit status 143 tells a requeue wrapper to resubmit."""

    def __init__(self, message: str):
        log.warning(message)
        super().__init__(143)


class Trainer:
    """``setup()`` / ``train()`` / ``save_model()`` / ``cleanup()``, in the spirit of torchtune's recipes."""

    def __init__(self, cfg: RunConfig, ds_config_path: str, method, evaluator=None):
        self.cfg, self.ds_config_path, self.method = cfg, ds_config_path, method
        # evaluator(model, tokenizer, step=, out_dir=) -> summary dict, from the entry point (evaluation's
        # trainer_evaluator for launch/train.py): the library never imports the evaluation package
        if cfg.eval.every and evaluator is None:
            raise ValueError("eval.every is set but this entry point gave the trainer no evaluator")
        self.evaluator = evaluator
        self.hp = {**method.defaults, **cfg.method.params}
        self.step, self.skipped, self.consecutive_bad = 0, 0, 0
        self.streak_start: int | None = None  # the first step of the current run of non-finite steps
        self.preempt_local, self.preempted = False, False
        self.first_scalars: dict | None = None
        self.last_scalars: dict = {}  # of the last step (restored on resume: a run resumed at its end reports it)
        self.step_times: list[tuple[float, float]] = []  # (seconds, global non-pad tokens) per optimizer step

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        import deepspeed
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.integrations import HfDeepSpeedConfig

        cfg = self.cfg
        for sig in (signal.SIGTERM, signal.SIGUSR1):  # SLURM preemption / time limit (sbatch --signal=USR1@300)
            signal.signal(sig, self._on_signal)
        dist.init(cfg.train.timeout)
        self.rank, self.world = dist.rank(), dist.world()
        self.device = torch.device(deepspeed.get_accelerator().current_device_name())
        on_cpu = self.device.type == "cpu"
        torch.manual_seed(cfg.train.seed)
        self.ds_config = load_ds_config(self.ds_config_path, cfg.train, self.world, on_cpu)
        self.gas = self.ds_config["gradient_accumulation_steps"]
        self.out_dir = cfg.train.output_dir
        self.ckpt_root = os.path.join(self.out_dir, "checkpoints")

        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.datasets = build_datasets(cfg.data, self.tokenizer, self.method.batches, cfg.train.seed)
        self.span_info = report_spans(self.datasets, self.method)  # logged; into summary.json
        pad = self.tokenizer.pad_token_id
        coll = lambda ex: collate(ex, pad)  # noqa: E731
        self.streams = {name: BatchStream(ds, cfg.train.batch_size, self.rank, self.world,
                                          cfg.train.seed + 1000 * k, coll)
                        for k, (name, ds) in enumerate(self.datasets.items()) if name != "idk"}
        self.collate = coll
        # before the policy is loaded: a precompute pass loads the reference, writes the cache and frees it
        self.reference = self._build_reference()

        # transformers loads under deepspeed.zero.Init while this object lives (ZeRO-3); no device_map here.
        self._hf_ds = HfDeepSpeedConfig(self.ds_config) if zero_stage(self.ds_config) == 3 else None
        dtype = torch.bfloat16 if self.ds_config.get("bf16", {}).get("enabled") else torch.float32
        model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=dtype,
                                                     trust_remote_code=cfg.model.trust_remote_code)
        model.config.use_cache = False
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if cfg.model.lora:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **cfg.model.lora))

        self.steps_per_epoch = max(1, self.streams["forget"].batches_per_epoch // self.gas)
        self.total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * self.steps_per_epoch))
        self.answer_only = cfg.train.answer_only_logits and _accepts_logits_to_keep(model)
        params = [p for p in model.parameters() if p.requires_grad]
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=self.ds_config)
        if cfg.train.head_path == "chunked" and not self.answer_only:
            raise lm_head.UnsupportedHead(f"train.head_path=chunked: {type(model).__name__}.forward takes no "
                                          "logits_to_keep, so no answer-only hidden states; set train.head_path: dense")
        if self.answer_only:  # the head path must give the model's own logits: refuse by name where it cannot
            self.head_spec = lm_head.head_spec(model)
            lm_head.verify(self.engine.module, self.head_spec)
        self.dual = self._build_dual()

        resume = self._resume_path()
        if resume:
            state = checkpoint.load(self.engine, resume)
            self.step, self.skipped = state["step"], state["skipped"]
            self.consecutive_bad, self.streak_start = state.get("consecutive_bad", 0), state.get("streak_start")
            self.first_scalars, self.last_scalars = state.get("first_scalars"), state.get("last_scalars") or {}
            for name, s in state["streams"].items():
                self.streams[name].load_state_dict(s)
            if self.dual is not None:
                self.dual.load_state_dict(state["dual"])
            log.info("resumed from %s at step %d", resume, self.step)
        tb = cfg.log.tensorboard_dir or os.path.join(self.out_dir, "tensorboard")
        self.monitor = Monitor(tb, self.total_steps, self.step, cfg.log.log_every)

    def _build_reference(self):
        from palu_ds.reference import build_reference

        return build_reference(self.cfg, self.method, self.hp, self.datasets, self.tokenizer, self.ds_config)

    def _build_dual(self):
        if not self.method.uses_dual:
            return None
        from palu_ds.dual import DualVariable

        dual = DualVariable.from_hparams(self.hp)
        if dual.needs_calibration:
            log.info("dual: eps = %.4f from the reference retain loss", dual.calibrate(self.reference.retain_loss()))
        self.hp["epsilon"] = dual.epsilon  # the objective's constant shift, so loss/total is the Lagrangian
        return dual

    def _on_signal(self, signum, frame) -> None:
        log.warning("signal %d: checkpointing at the end of this step, then exiting for requeue", signum)
        self.preempt_local = True

    def _resume_path(self) -> str | None:
        r = self.cfg.train.resume
        if r == "never":
            return None
        if r == "auto":
            return checkpoint.resume_point(self.ckpt_root, log=log)  # verified; a broken one falls back
        if not os.path.isfile(os.path.join(r, checkpoint.MARKER)):
            raise FileNotFoundError(f"train.resume={r} is not a complete checkpoint (no {checkpoint.MARKER} marker)")
        return checkpoint.resume_point(self.ckpt_root, explicit=r)

    def _lr_factor(self, step: int) -> float:
        t = self.cfg.train
        if t.warmup_steps and step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        frac = (step - t.warmup_steps) / max(1, self.total_steps - t.warmup_steps)
        return {"constant": 1.0, "linear": max(0.0, 1 - frac),
                "cosine": 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))}[t.scheduler]

    # ------------------------------------------------------------------ one step
    def _next_micro(self) -> dict[str, dict]:
        micro = {name: s.next() for name, s in self.streams.items()}
        if "idk" in self.datasets:  # the refusal answers of the very same forget prompts
            micro["idk"] = self.collate([self.datasets["idk"][int(i)] for i in micro["forget"]["example_id"]])
        return micro

    def _forward(self, micro: dict[str, dict]) -> dict:
        """All batches of a micro-batch in one forward (one ZeRO-3 gather of the weights instead of several).

        With ``train.answer_only_logits`` (default) the LM head runs once, only on the positions whose next token
        is an answer token (:class:`palu_ds.batch.PackedLogits`): prompt and padding never form V-wide logits."""
        names = list(micro)
        width = max(micro[n]["input_ids"].shape[1] for n in names)
        pad = self.tokenizer.pad_token_id

        def widen(t, value):
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

        ids = torch.cat([widen(micro[n]["input_ids"], pad) for n in names]).to(self.device)
        mask = torch.cat([widen(micro[n]["attention_mask"], 0) for n in names]).to(self.device)
        if not self.answer_only:
            logits = self.engine(input_ids=ids, attention_mask=mask).logits
            out, row = {}, 0
            for n in names:
                b, t = micro[n]["input_ids"].shape
                out[n] = logits[row:row + b, :t]
                row += b
            return out
        hidden = self.engine(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                             logits_to_keep=1).hidden_states[-1]
        answers, rows, row = {}, [], 0
        for n in names:
            b, t = micro[n]["input_ids"].shape
            answers[n] = micro[n]["labels"][:, 1:] != IGNORE_INDEX
            rows.append(hidden[row:row + b, :t - 1][answers[n]])
            row += b
        if self.cfg.train.head_path == "chunked":  # hidden rows only: logits formed chunk by chunk in the terms
            return lm_head.chunked_logits(lm_head.output_head(self.engine.module), self.head_spec, torch.cat(rows),
                                          answers, self.cfg.train.head_chunk_elems)
        logits = lm_head.lm_logits(self.engine.module, torch.cat(rows), self.head_spec)
        out = {}
        for n, part in zip(names, logits.split([int(a.sum()) for a in answers.values()])):
            out[n] = PackedLogits(part, answers[n])
        return out

    def train_step(self) -> dict[str, float]:
        from palu_ds.methods import StepInputs

        t0 = time.perf_counter()
        window = [self._next_micro() for _ in range(self.gas)]
        names = list(window[0])
        counts = torch.stack([torch.stack([batch_counts(m[n]) for n in names]) for m in window]).sum(0)
        counts = dist.all_reduce_sum(counts).clamp_min(1)
        norms = {n: {k: counts[i, j].to(self.device, torch.float32) for j, k in enumerate(COUNT_KEYS)}
                 for i, n in enumerate(names)}
        lam = self.dual.value if self.dual is not None else 0.0
        term_sums: dict[str, torch.Tensor] = {}
        tokens, bad = 0, False
        for k, micro in enumerate(window):
            micro = {n: {key: v.to(self.device) for key, v in b.items()} for n, b in micro.items()}
            ref = {n: self.reference.lookup(n, b) for n, b in micro.items()}
            logits = self._forward(micro)
            terms = lm_head.within_head(logits, lambda lg: self.method.terms(  # chunked: inside one head call
                StepInputs(logits=lg, batches=micro, ref=ref, normalizers=norms), self.hp))
            if self.dual is not None:  # dual_update=micro_batch moves it between micro-batches (open-unlearning)
                lam = self.dual.value
            loss = self.method.objective(terms, self.hp, lam) * (self.world * self.gas)
            if "nan_from" in FAULT and self.step + 1 >= int(FAULT["nan_from"]):
                loss = loss * float("nan")
            if not torch.isfinite(loss):  # local decision; all ranks still run backward, so collectives match
                bad = True
                loss = lm_head.within_head(logits, lambda lg: sum(
                    v.zero_loss() if isinstance(v, PackedLogits) else torch.nan_to_num(v).sum() * 0.0
                    for v in lg.values()))
            for name, v in terms.items():
                term_sums[name] = term_sums.get(name, 0.0) + v.detach().float()
            tokens += sum(int(b["attention_mask"].sum()) for n, b in micro.items() if n != "idk")
            self.engine.backward(loss)
            if self.dual is not None and self.dual.update_on == "micro_batch":
                self._micro_dual_step(terms["retain"], micro["retain"], norms["retain"]["answer"])
            if k < self.gas - 1:
                self.engine.step()
        # one all-reduce per step: every term (already divided by the global counts), tokens, the non-finite flag
        keys = sorted(term_sums)
        vec = torch.stack([torch.nan_to_num(torch.as_tensor(term_sums[k]), nan=0.0, posinf=0.0, neginf=0.0)
                           .to(self.device).reshape(()) for k in keys]
                          + [torch.tensor(float(x), device=self.device) for x in (self.preempt_local, tokens, bad)])
        vec = dist.all_reduce_sum(vec.double()).tolist()
        terms_g = dict(zip(keys, vec[:-3]))
        self.preempted, any_bad = vec[-3] > 0, vec[-1] > 0
        lr = 0.0 if any_bad else self.cfg.train.lr * self._lr_factor(self.step)
        for g in self.engine.optimizer.param_groups:
            g["lr"] = lr
        with skipped_update(self.engine) if any_bad else nullcontext():  # skip: Adam's state does not move either
            self.engine.step()
        self.step += 1
        if any_bad:
            self.skipped += 1
            self.consecutive_bad += 1
            if self.consecutive_bad == 1:
                self.streak_start = self.step
        else:
            self.consecutive_bad, self.streak_start = 0, None
            if self.dual is not None:  # from the value all-reduced above: no second collective
                self.dual.after_step(terms_g["retain"], self.step, self.steps_per_epoch)
        dt = time.perf_counter() - t0
        self.step_times.append((dt, vec[-2]))
        scalars = {f"loss/{k}": v for k, v in terms_g.items()}
        scalars["loss/total"] = float(self.method.objective({k: torch.tensor(v) for k, v in terms_g.items()},
                                                            self.hp, lam)) if not any_bad else float("nan")
        if self.dual is not None:
            scalars["dual/lambda"] = self.dual.value
            scalars["dual/slack"] = terms_g.get("retain", float("nan")) - self.dual.epsilon
        scalars.update({"lr": lr, "throughput/tokens_per_s": vec[-2] / dt,
                        "memory/peak_bytes": float(peak_memory_bytes()), "skipped_steps": float(self.skipped)})
        gn = self.engine.get_global_grad_norm()
        if gn is not None:
            scalars["grad/norm"] = float(gn)
        return scalars

    # ------------------------------------------------------------------ loop
    def _micro_dual_step(self, retain_term, retain_batch, window_count) -> None:
        """``dual_update=micro_batch``: one dual step from this micro-batch's mean retain NLL over all ranks (the
        term is ``local_sum / window_count``; one scalar all-reduce per micro-batch, in this mode only)."""
        local = torch.stack([retain_term.detach().double().reshape(()) * window_count.double(),
                             batch_counts(retain_batch)[0].to(retain_term.device).double()])
        total, count = dist.all_reduce_sum(local).tolist()
        if count > 0 and math.isfinite(total):
            self.dual.after_micro_batch(total / count, self.step, self.steps_per_epoch)

    def train(self) -> dict[str, float]:
        last = self.last_scalars
        reset_peak_memory()  # memory/peak_bytes: the training steps, not the loading transients
        watchdog = dist.StepWatchdog(self.cfg.train.timeout)
        while self.step < self.total_steps:
            watchdog.arm(f"optimizer step {self.step + 1}")
            if FAULT.get("stop_rank") == str(self.rank) and self.step == int(FAULT.get("stop_at", 3)):
                os.kill(os.getpid(), signal.SIGSTOP)  # fault injection: this rank hangs (a stopped peer)
            last = self.last_scalars = self.train_step()
            watchdog.disarm()
            if self.first_scalars is None:
                self.first_scalars = last
            self.monitor.step(self.step, last)
            if self.consecutive_bad >= self.cfg.train.max_nonfinite:
                path = self.save_checkpoint()
                raise FloatingPointError(
                    f"{self.consecutive_bad} optimizer steps in a row had a non-finite loss term (step {self.step}); "
                    f"stopped with a checkpoint at {path}. Lower train.lr, check the data, or raise "
                    "train.max_nonfinite.")
            if self.cfg.train.save_every and self.step % self.cfg.train.save_every == 0:
                self.save_checkpoint()
            if self.cfg.eval.every and self.step % self.cfg.eval.every == 0:
                self.evaluate()
            if FAULT.get("crash_after") == str(self.step):
                os._exit(17)
            if self.preempted:  # every rank saw the flag in the step's all-reduce: stop together
                path = self.save_checkpoint()
                raise Preempted(f"preempted at step {self.step}; checkpoint {path}; rerun the same command "
                                "(or let SLURM requeue it) to resume")
        watchdog.close()
        if not checkpoint.latest(self.ckpt_root) or not checkpoint.latest(self.ckpt_root).endswith(
                checkpoint.tag_for(self.step)):
            self.save_checkpoint()
        return last

    def evaluate(self) -> dict:
        """The run's evaluator on the model being trained (every rank; examples split and merged); metrics go to
        TensorBoard as ``eval/<name>`` and the evaluator writes its JSONs to ``<output_dir>/eval/step_<N>``."""
        summary = self.evaluator(self.engine, self.tokenizer, step=self.step,
                                 out_dir=os.path.join(self.out_dir, "eval", checkpoint.tag_for(self.step)))
        metrics = {f"eval/{k}": float(v) for k, v in summary.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.monitor.step_scalars(self.step, metrics)
        return metrics

    def client_state(self) -> dict:
        return {"step": self.step, "skipped": self.skipped, "consecutive_bad": self.consecutive_bad,
                "streak_start": self.streak_start, "first_scalars": self.first_scalars,
                "last_scalars": self.last_scalars,
                "streams": {n: s.state_dict() for n, s in self.streams.items()},
                "dual": self.dual.state_dict() if self.dual is not None else None,
                "method": self.method.name, "hp": self.hp,
                "config": asdict(self.cfg)}

    def save_checkpoint(self) -> str:
        return checkpoint.save(self.engine, self.ckpt_root, self.step, self.client_state(), self.cfg.train.keep_last,
                               protect_before=self.streak_start)  # the last state before a NaN streak stays

    def save_model(self, out: str | None = None) -> str:
        """The final model as a normal HF dir (safetensors + tokenizer), written to a temp dir then renamed.

        ZeRO-3 weights are gathered (16-bit when trained in 16-bit, else fp32); LoRA adapters are merged into the
        base weights so the dir loads with plain ``from_pretrained``."""
        from contextlib import nullcontext

        import deepspeed

        out = out or os.path.join(self.out_dir, "model")
        if "crash_in_save_model" in FAULT:
            os._exit(17)  # fault injection: the final save fails after the final checkpoint
        stage3 = zero_stage(self.ds_config) == 3
        module, state = self.engine.module, None
        if self.cfg.model.lora:
            gather = (deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0) if stage3
                      else nullcontext())
            with gather:
                if dist.is_main():
                    module = module.merge_and_unload()
                    copies, state = {}, {}  # one copy per storage: tied weights stay one tensor, saved once
                    for k, v in module.state_dict().items():
                        if v.data_ptr() not in copies:
                            copies[v.data_ptr()] = v.detach().clone()
                        state[k] = copies[v.data_ptr()]
        elif stage3:
            state = self.engine._zero3_consolidated_16bit_state_dict()  # every rank takes part; rank 0 gets it
        elif dist.is_main():
            state = module.state_dict()
        if dist.is_main():
            with atomic_path(out) as tmp:
                module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
                self.tokenizer.save_pretrained(tmp)
        dist.barrier()
        return out

    def cleanup(self) -> None:
        self.monitor.close()
        dist.barrier()
