"""The training loop: setup, train, checkpoint, resume, log -- for any method of the registry.

One optimizer step = ``grad_accum`` micro-batches per rank. Each micro-batch holds the batches the method declares
(``Method.batches``: the sampled ones, plus any ``paired`` batch built from its partner's prompts); they go through
the model in ONE forward (concatenated), the method turns logits (+ reference tensors) into named loss terms, and its
objective is back-propagated. The engine knows no method by name: it asks the :class:`palu_ds.methods.Method`.

Normalisation is global: before a step the token/sequence counts of the whole window on every rank are all-reduced
(one collective), each term is ``local_sum / global_count``, and the loss handed to DeepSpeed is multiplied by
``world × grad_accum`` to undo its gradient averaging -- so the update equals the one of a single process holding the
whole global batch, for any world size and accumulation. After backward, the term values, token count and a
non-finite flag are all-reduced once (:class:`StepStats`); rank-identical λ is updated from the all-reduced
constraint term (palu_ds.dual). A step reads top to bottom in :meth:`Trainer.train_step`.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial

import torch

from palu_ds import checkpoint, dist, lm_head, packing, run_folder
from palu_ds.atomic import atomic_path, write_json
from palu_ds.batch import IGNORE_INDEX, PackedLogits, shift
from palu_ds.card import run_info, write_card
from palu_ds.config import ConfigError, Run
from palu_ds.data.build import build_datasets, report_spans
from palu_ds.data.collate import collate
from palu_ds.dither import dither_model
from palu_ds.ds_config import autocast_dtype, load_ds_config, zero_stage
from palu_ds.hidden import LayerCapture
from palu_ds.monitor import Monitor, peak_memory_bytes, reset_peak_memory, start_wandb
from palu_ds.sampling import BatchStream
from palu_ds.schedule import lr_at

log = logging.getLogger("palu_ds")

COUNT_KEYS = ("answer", "sens", "common", "seqs")


def batch_counts(batch: dict) -> torch.Tensor:
    """Counts of the (shifted) target positions of each kind and of sequences: the global normalisers."""
    _, labels, sens, common = shift(batch["input_ids"], batch["labels"], batch["sens_mask"], batch["common_mask"])
    answer = labels != IGNORE_INDEX
    return torch.tensor([answer.sum(), sens.sum(), common.sum(), (answer.sum(1) > 0).sum()], dtype=torch.float64)


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


def zero_loss(logits: dict) -> torch.Tensor:
    """A finite 0 attached to every logits tensor of the micro-batch: what a non-finite micro-batch back-propagates,
    so that every rank still runs the same backward (and collectives) but no gradient moves."""
    return lm_head.within_head(logits, lambda lg: sum(
        v.zero_loss() if isinstance(v, PackedLogits) else torch.nan_to_num(v).sum() * 0.0 for v in lg.values()))


class Preempted(SystemExit):
    """Raised after the preemption checkpoint; exit status 143 tells a requeue wrapper to resubmit."""

    def __init__(self, message: str):
        log.warning(message)
        super().__init__(143)


class Hooks:
    """The points of the loop where a test steps in (fault injection: tests/faulty_train.py); the library installs
    none, and a run without hooks runs these no-ops. Each receives the :class:`Trainer`."""

    def before_step(self, trainer) -> None:
        """Before the window of optimizer step ``trainer.step + 1`` is drawn."""

    def loss(self, trainer, loss: torch.Tensor) -> torch.Tensor:
        """Each micro-batch's scaled loss, before the non-finite check and backward; returns the loss to use."""
        return loss

    def after_step(self, trainer) -> None:
        """After optimizer step ``trainer.step`` and its checkpoint / evaluation, before a preemption stop."""

    def before_save_model(self, trainer) -> None:
        """When the final model is about to be written (after the final checkpoint)."""


@dataclass
class StepStats:
    """What one optimizer step's micro-batches leave behind on this rank, then (:meth:`reduce`) over all ranks.

    ``terms``: each loss term summed over the window (each already ``local_sum / global_count``, so the sum over
    ranks is the global term); ``tokens``: non-pad tokens of the sampled batches; ``bad``: a micro-batch had a
    non-finite loss; ``preempted``: a rank got SIGTERM/SIGUSR1; ``lam``: the λ the last micro-batch used."""

    terms: dict[str, float | torch.Tensor] = field(default_factory=dict)
    tokens: float = 0
    bad: bool = False
    preempted: bool = False
    lam: float = 0.0

    def add(self, terms: dict[str, torch.Tensor], tokens: int) -> None:
        for name, v in terms.items():
            self.terms[name] = self.terms.get(name, 0.0) + v.detach().float()
        self.tokens += tokens

    def reduce(self, device) -> "StepStats":
        """The step's global values: one all-reduce of the terms (non-finite ones as 0), tokens and both flags."""
        keys = sorted(self.terms)
        vec = torch.stack([torch.nan_to_num(torch.as_tensor(self.terms[k]), nan=0.0, posinf=0.0, neginf=0.0)
                           .to(device).reshape(()) for k in keys]
                          + [torch.tensor(float(x), device=device) for x in (self.preempted, self.tokens, self.bad)])
        vec = dist.all_reduce_sum(vec.double()).tolist()
        return StepStats(dict(zip(keys, vec[:-3])), vec[-2], vec[-1] > 0, vec[-3] > 0, self.lam)


class Trainer:
    """``setup()`` / ``train()`` / ``save_model()`` / ``summary()`` / ``cleanup()``, in the spirit of torchtune's
    recipes, for a resolved run (palu_ds.config.resolve)."""

    def __init__(self, run: Run, ds_config_path: str, hooks: Hooks | None = None, evaluator=None):
        self.run, self.cfg, self.method, self.hp = run, run.cfg, run.method, run.hp
        self.ds_config_path, self.hooks = ds_config_path, hooks or Hooks()
        # evaluator(model, tokenizer, step=, out_dir=) -> summary dict, from the entry point (palu_eval's
        # trainer_evaluator for launch/train.py): the library never imports the palu_eval package
        if self.cfg.eval.enabled and evaluator is None:
            raise ValueError("eval.every / eval.epochs is set but this entry point gave the trainer no evaluator")
        self.evaluator = evaluator
        self.step, self.skipped, self.consecutive_bad = 0, 0, 0
        self.streak_start: int | None = None  # the first step of the current run of non-finite steps
        self.preempt_local, self.preempted = False, False
        self.first_scalars: dict | None = None
        self.last_scalars: dict = {}  # of the last step (restored on resume: a run resumed at its end reports it)
        self.step_times: list[tuple[float, float]] = []  # (seconds, global non-pad tokens) per optimizer step
        self.peak_memory: list[int] = []  # per rank, of the training steps (gathered at the end of train())
        self.model_dir: str | None = None  # where save_model() wrote the final model
        self.last_eval: dict | None = None  # {"step": N, "metrics": evaluator summary}: into the model card
        self.config_changes: dict = {}  # what train.resume=force let differ from the checkpoint's config
        self.capture = None  # the decoder layer whose output a method reads (Method.hidden_layer), set in setup
        self.padding_free = False  # whether the forward runs rows end to end (train.padding_free), set in setup
        self.output_lock = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        import deepspeed

        cfg = self.cfg
        for sig in (signal.SIGTERM, signal.SIGUSR1):  # SLURM preemption / time limit (sbatch --signal=USR1@300)
            signal.signal(sig, self._on_signal)
        dist.init(cfg.train.timeout)
        self.rank, self.world = dist.rank(), dist.world()
        self.device = torch.device(deepspeed.get_accelerator().current_device_name())
        torch.manual_seed(cfg.train.seed)
        self.ds_config = load_ds_config(self.ds_config_path, cfg.train, self.world, self.device.type == "cpu")
        self.gas = self.ds_config["gradient_accumulation_steps"]
        self.autocast = autocast_dtype(self.ds_config)  # bf16: DeepSpeed autocasts the model's forward
        if self.world == 1 and zero_stage(self.ds_config) in (1, 2):
            log.warning("ZeRO stage %d on one process partitions nothing and costs time and memory (its flat gradient "
                        "copies): use a stage-0 config (ds_configs/cpu/zero0.json)", zero_stage(self.ds_config))
        self.out_dir = cfg.train.output_dir
        self.ckpt_root = os.path.join(self.out_dir, "checkpoints")
        self.output_lock = run_folder.lock(self.out_dir)  # held by rank 0 until the process ends
        resume = self._resume_path()  # chosen by rank 0, verified on every rank
        self.config_changes = run_folder.check_resume_config(resume, self.cfg, self.hp)
        run_folder.set_aside_stale_outputs(self.out_dir)
        self._setup_data()
        # before the policy is loaded: a precompute pass loads the reference, writes the cache and frees it
        self.reference = self._build_reference()
        self._setup_model()
        self.dual = self._build_dual()
        self._resume(resume)
        wandb_run = start_wandb(cfg, {**asdict(cfg), "hp": dict(self.hp), "world_size": self.world})
        self.monitor = Monitor(cfg.log.tensorboard_dir, self.total_steps, self.step, cfg.log.log_every,
                               method=self.method, epsilon=self._epsilon(), wandb_run=wandb_run)

    def _setup_data(self) -> None:
        """Tokenizer, one data set per batch of the method, one sampler per sampled batch."""
        from transformers import AutoTokenizer

        cfg = self.cfg
        self.tokenizer = AutoTokenizer.from_pretrained(self.run.tokenizer_path,
                                                       trust_remote_code=cfg.model.trust_remote_code)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.datasets = build_datasets(cfg.data, self.tokenizer, self.method, cfg.train.seed)
        self.span_info = report_spans(self.datasets, self.method)  # logged; into summary.json
        pad = self.tokenizer.pad_token_id
        self.collate = lambda ex: collate(ex, pad)  # noqa: E731
        self.streams = {name: BatchStream(ds, cfg.train.batch_size, self.rank, self.world,
                                          cfg.train.seed + 1000 * k, self.collate)
                        for k, (name, ds) in enumerate(self.datasets.items()) if name in self.method.sampled}

    def _load_model(self):
        """The policy as transformers builds it (under deepspeed.zero.Init for ZeRO-3), with LoRA if configured."""
        from transformers import AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig

        cfg = self.cfg
        if cfg.train.bf16_dither and self.autocast != torch.bfloat16:
            raise ConfigError(f"train.bf16_dither=true applies to bf16 training, but this run resolves to fp32 "
                              f"(train.precision={cfg.train.precision} with {self.ds_config_path}): set "
                              "train.precision=bf16 or drop train.bf16_dither")
        # transformers loads under deepspeed.zero.Init while this object lives (ZeRO-3); no device_map here.
        self._hf_ds = HfDeepSpeedConfig(self.ds_config) if zero_stage(self.ds_config) == 3 else None
        # fp32 in every precision: bf16 is autocast, the fp32 weights are the master weights (palu_ds.ds_config)
        model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32,
                                                     trust_remote_code=cfg.model.trust_remote_code)
        model.config.use_cache = False
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if cfg.model.lora:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **cfg.model.lora))
        if cfg.train.bf16_dither:  # the products then see sub-ulp updates on average (palu_ds.dither)
            dither_model(model, cfg.train.seed)  # a resumed run then loads its checkpoint's weights over these
        return model

    def _setup_model(self) -> None:
        """The DeepSpeed engine around the policy, the run's length and the LM-head path."""
        import deepspeed

        cfg, model = self.cfg, self._load_model()
        self.steps_per_epoch = max(1, self.streams[self.method.epoch_batch].batches_per_epoch // self.gas)
        self.total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * self.steps_per_epoch))
        self.answer_only = cfg.train.answer_only_logits and lm_head.accepts_logits_to_keep(model)
        params = [p for p in model.parameters() if p.requires_grad]
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=self.ds_config)
        if self.world == 1 and zero_stage(self.ds_config) == 0:  # else DeepSpeed flattens every gradient into one
            self.engine.enable_backward_allreduce = False       # buffer, all-reduces it with itself and copies it back
        if cfg.train.head_path == "chunked" and not self.answer_only:
            raise lm_head.UnsupportedHead(f"train.head_path=chunked: {type(model).__name__}.forward takes no "
                                          "logits_to_keep, so no answer-only hidden states; set train.head_path: dense")
        if self.answer_only:  # the head path must give the model's own logits: refuse by name where it cannot
            self.head_spec = lm_head.head_spec(model)
            lm_head.verify(self.engine.module, self.head_spec)
        # rows end to end, attention within each (palu_ds.packing): for sdpa models, checked against the padded forward
        self.padding_free = packing.start(self.engine.module, cfg.train.padding_free)
        layer = self.method.layer(self.hp)  # a method that reads a decoder layer's output (RMU): hooked here
        self.capture = None if layer is None else LayerCapture(self.engine.module, layer)

    def _build_reference(self):
        from palu_ds.reference import build_reference

        return build_reference(self.cfg, self.method, self.hp, self.datasets, self.tokenizer, self.ds_config)

    def _build_dual(self):
        """The dual variable of the method's constraint (None without one); a relative eps is calibrated here."""
        if not self.method.uses_dual:
            return None
        from palu_ds.dual import DualVariable

        dual = DualVariable.from_hparams(self.hp)
        if dual.needs_calibration:
            log.info("dual: eps = %.4f from the reference's %s loss", dual.calibrate(self.reference.retain_loss()),
                     self.method.constraint)
        return dual

    def _on_signal(self, signum, frame) -> None:
        log.warning("signal %d: checkpointing at the end of this step, then exiting for requeue", signum)
        self.preempt_local = True

    def _resume_path(self) -> str | None:
        r = self.cfg.train.resume
        if r == "never":
            return None
        if r in ("auto", "force"):
            return checkpoint.resume_point(self.ckpt_root, log=log)  # verified; a broken one falls back
        if not os.path.isfile(os.path.join(r, checkpoint.MARKER)):
            raise FileNotFoundError(f"train.resume={r} is not a complete checkpoint (no {checkpoint.MARKER} marker)")
        return checkpoint.resume_point(self.ckpt_root, explicit=r)

    def _resume(self, resume: str | None) -> None:
        """Weights, optimizer, samplers, λ and the step counters from the checkpoint to resume (if any)."""
        if not resume:
            return
        state = checkpoint.load(self.engine, resume)  # after a collective check that every rank loads this one
        self.step, self.skipped = state["step"], state["skipped"]
        self.consecutive_bad, self.streak_start = state.get("consecutive_bad", 0), state.get("streak_start")
        self.first_scalars, self.last_scalars = state.get("first_scalars"), state.get("last_scalars") or {}
        for name, s in state["streams"].items():
            self.streams[name].load_state_dict(s)
        if self.dual is not None:
            self.dual.load_state_dict(state["dual"])
        log.info("resumed from %s at step %d", resume, self.step)

    # ------------------------------------------------------------------ one step, top to bottom
    def train_step(self) -> dict[str, float]:
        """One optimizer step: draw the window, count its targets over all ranks, run each micro-batch forward and
        backward, reduce what they left (one all-reduce), update (or skip a non-finite step), move λ, report."""
        t0 = time.perf_counter()
        window = [self._next_micro() for _ in range(self.gas)]
        norms = self._global_counts(window)
        stats = StepStats(lam=self._lam())
        for k, micro in enumerate(window):
            self._micro_step(micro, norms, stats)
            if k < self.gas - 1:
                self.engine.step()  # DeepSpeed accumulates: no update before the window's last micro-batch
        stats.preempted = self.preempt_local  # a signal that came during the window stops after this step
        step = stats.reduce(self.device)
        self.preempted = step.preempted  # every rank saw the flag: they stop together
        lr, overflow = self._optimizer_step(step.bad)
        self._count_step(step, overflow)
        return self._scalars(step, lr, time.perf_counter() - t0)

    def _next_micro(self) -> dict[str, dict]:
        """One micro-batch: a batch from each sampler, and each paired batch for its partner's very rows."""
        micro = {name: s.next() for name, s in self.streams.items()}
        for name, partner in self.method.paired.items():
            micro[name] = self.collate([self.datasets[name][int(i)] for i in micro[partner]["example_id"]])
        return micro

    def _global_counts(self, window: list[dict]) -> dict[str, dict[str, torch.Tensor]]:
        """Per batch, the window's target counts summed over all ranks (:data:`COUNT_KEYS`): the normalisers."""
        names = list(window[0])
        counts = torch.stack([torch.stack([batch_counts(m[n]) for n in names]) for m in window]).sum(0)
        counts = dist.all_reduce_sum(counts).clamp_min(1)
        return {n: {k: counts[i, j].to(self.device, torch.float32) for j, k in enumerate(COUNT_KEYS)}
                for i, n in enumerate(names)}

    def _micro_step(self, micro: dict[str, dict], norms: dict, stats: StepStats) -> None:
        """Forward, the method's terms and objective, backward of one micro-batch (a non-finite loss: a zero)."""
        from palu_ds.methods import StepInputs

        tokens = sum(int(micro[n]["attention_mask"].sum()) for n in self.method.sampled)  # on the host: no device sync
        micro = {n: {key: v.to(self.device) for key, v in b.items()} for n, b in micro.items()}
        ref = {n: self.reference.lookup(n, b) for n, b in micro.items()}
        logits, hidden = self._forward(micro)
        stats.lam = self._lam()  # dual_update=micro_batch moves λ between micro-batches (open-unlearning)
        objective = partial(self.method.objective, hp=self.hp, lam=stats.lam, epsilon=self._epsilon())
        terms = lm_head.within_head(logits, lambda lg: self.method.terms(  # chunked: inside one head call, fused
            StepInputs(logits=lg, batches=micro, ref=ref, normalizers=norms, hidden=hidden), self.hp), objective)
        loss = objective(terms) * (self.world * self.gas)
        loss = self.hooks.loss(self, loss)
        if not torch.isfinite(loss):  # local decision; all ranks still run backward, so collectives match
            stats.bad = True
            loss = zero_loss(logits)
        stats.add(terms, tokens)
        self.engine.backward(loss)
        self._micro_dual_step(terms, micro, norms)

    @property
    def ds_skipped(self) -> int:
        """DeepSpeed's own count of updates it skipped (its overflow check; 0 where the engine keeps none)."""
        return getattr(self.engine, "skipped_steps", 0)

    def _optimizer_step(self, bad: bool) -> tuple[float, bool]:
        """The update with this step's scheduled lr; a non-finite step changes nothing the optimizer owns. Also
        returns whether DeepSpeed skipped the update itself (a non-finite gradient: its overflow check, agreed over
        the ranks, bumps its ``skipped_steps`` counter)."""
        lr = 0.0 if bad else lr_at(self.step, self.cfg.train, self.total_steps)
        for g in self.engine.optimizer.param_groups:
            g["lr"] = lr
        ds_skipped = self.ds_skipped
        with skipped_update(self.engine) if bad else nullcontext():  # skip: Adam's state does not move either
            self.engine.step()
        self.step += 1
        return lr, self.ds_skipped > ds_skipped

    def _count_step(self, step: StepStats, overflow: bool = False) -> None:
        """Skipped-step bookkeeping (a non-finite loss, or DeepSpeed's own overflow skip: one streak rule); a finite
        step moves λ from the all-reduced constraint (no second collective)."""
        if overflow:
            log.warning("step %d: DeepSpeed skipped the update (non-finite gradient norm, its overflow check); "
                        "counted as a non-finite step", self.step)
        if step.bad or overflow:
            self.skipped += 1
            self.consecutive_bad += 1
            if self.consecutive_bad == 1:
                self.streak_start = self.step
            return
        self.consecutive_bad, self.streak_start = 0, None
        if self.dual is not None:
            self.dual.after_step(step.terms[self.method.constraint], self.step, self.steps_per_epoch)

    def _scalars(self, step: StepStats, lr: float, seconds: float) -> dict[str, float]:
        """The step's logged values: global terms, the objective, λ and slack, lr, throughput, memory, grad norm."""
        self.step_times.append((seconds, step.tokens))
        scalars = {f"loss/{k}": v for k, v in step.terms.items()}
        scalars["loss/total"] = float(self.method.objective({k: torch.tensor(v) for k, v in step.terms.items()},
                                                            self.hp, step.lam, self._epsilon())
                                      ) if not step.bad else float("nan")
        if self.dual is not None:
            scalars["dual/lambda"] = self.dual.value
            scalars["dual/slack"] = step.terms.get(self.method.constraint, float("nan")) - self.dual.epsilon
        scalars.update({"lr": lr, "throughput/tokens_per_s": step.tokens / seconds,
                        "memory/peak_bytes": float(peak_memory_bytes()), "skipped_steps": float(self.skipped),
                        "deepspeed_skipped_steps": float(self.ds_skipped)})
        gn = self.engine.get_global_grad_norm()
        if gn is not None:
            scalars["grad/norm"] = float(gn)
        return scalars

    # ------------------------------------------------------------------ the forward of one micro-batch
    def _forward(self, micro: dict[str, dict]) -> tuple[dict, dict]:
        """All batches of a micro-batch in one forward (one ZeRO-3 gather of the weights instead of several): each
        batch's logits and, for a method that reads a decoder layer (RMU), its rows of that layer's output.

        With ``train.padding_free`` (default) the rows run end to end without padding (palu_ds.packing); the outputs
        come back in the padded layout. With ``train.answer_only_logits`` (default) the LM head runs once, only on
        the positions whose next token is an answer token (:class:`palu_ds.batch.PackedLogits`): prompt and padding
        never form V-wide logits."""
        names = list(micro)
        width = max(micro[n]["input_ids"].shape[1] for n in names)
        pad = self.tokenizer.pad_token_id

        def widen(t, value):
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

        ids = torch.cat([widen(micro[n]["input_ids"], pad) for n in names]).to(self.device)
        mask = torch.cat([widen(micro[n]["attention_mask"], 0) for n in names]).to(self.device)
        # bf16: one autocast region over the model (DeepSpeed's own nests in it) and the answer-only head,
        # so the tied head weight is cast once per forward; the loss terms run outside it, in fp32
        with torch.autocast(self.device.type, self.autocast) if self.autocast else nullcontext():
            if self.answer_only:
                out, unpack = packing.forward(self.engine, ids, mask, self.padding_free, output_hidden_states=True,
                                              logits_to_keep=1)
                logits = self._packed_logits(micro, unpack(out.hidden_states[-1]))
            else:  # [B, T, V] logits of each batch (its rows of the concatenated forward, cut to its own width)
                out, unpack = packing.forward(self.engine, ids, mask, self.padding_free)
                logits = self._split_rows(unpack(out.logits), micro)
        hidden = self._split_rows(unpack(self.capture.output), micro) if self.capture is not None else {}
        return logits, hidden

    @staticmethod
    def _split_rows(joint: torch.Tensor, micro: dict[str, dict]) -> dict:
        """Each batch's rows of a tensor of the concatenated forward ([B_all, T, ...]), cut to its own width."""
        out, row = {}, 0
        for n, b in micro.items():
            rows, width = b["input_ids"].shape
            out[n] = joint[row:row + rows, :width]
            row += rows
        return out

    def _packed_logits(self, micro: dict[str, dict], hidden: torch.Tensor) -> dict:
        """Each batch's logits at its answer positions only (dense head) or their hidden rows (chunked head), from
        the final hidden states [B_all, T, D] of the concatenated forward."""
        answers, rows, row = {}, [], 0
        for n, b in micro.items():
            size, width = b["input_ids"].shape
            answers[n] = b["labels"][:, 1:] != IGNORE_INDEX
            rows.append(hidden[row:row + size, :width - 1][answers[n]])
            row += size
        if self.cfg.train.head_path == "chunked":  # hidden rows only: logits formed chunk by chunk in the terms
            return lm_head.chunked_logits(lm_head.output_head(self.engine.module), self.head_spec, torch.cat(rows),
                                          answers, self.cfg.train.head_chunk_elems)
        logits = lm_head.lm_logits(self.engine.module, torch.cat(rows), self.head_spec)
        parts = logits.split([int(a.sum()) for a in answers.values()])
        return {n: PackedLogits(part, answers[n]) for n, part in zip(micro, parts)}

    # ------------------------------------------------------------------ the dual variable
    def _lam(self) -> float:
        return self.dual.value if self.dual is not None else 0.0

    def _epsilon(self) -> float | None:
        """The constraint's eps (calibrated when relative); None: the method has no constraint."""
        return self.dual.epsilon if self.dual is not None else None

    def _micro_dual_step(self, terms: dict, micro: dict, norms: dict) -> None:
        """``dual_update=micro_batch``: one dual step from this micro-batch's mean constraint NLL over all ranks (the
        term is ``local_sum / window_count``; one scalar all-reduce per micro-batch, in this mode only)."""
        if self.dual is None or self.dual.update_on != "micro_batch":
            return
        c = self.method.constraint
        local = torch.stack([terms[c].detach().double().reshape(()) * norms[c]["answer"].double(),
                             batch_counts(micro[c])[0].to(terms[c].device).double()])
        total, count = dist.all_reduce_sum(local).tolist()
        if count > 0 and math.isfinite(total):
            self.dual.after_micro_batch(total / count, self.step, self.steps_per_epoch)

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict[str, float]:
        """Optimizer steps until ``total_steps`` (each bounded by the watchdog), then a final checkpoint."""
        last = self.last_scalars
        reset_peak_memory()  # memory/peak_bytes: the training steps, not the loading transients
        watchdog = dist.StepWatchdog(self.cfg.train.timeout)
        while self.step < self.total_steps:
            watchdog.arm(f"optimizer step {self.step + 1}")
            self.hooks.before_step(self)
            last = self.last_scalars = self.train_step()
            watchdog.disarm()
            self._after_step(last)
        watchdog.close()
        latest = checkpoint.latest(self.ckpt_root)
        if not latest or not latest.endswith(checkpoint.tag_for(self.step)):
            self.save_checkpoint()
        self.peak_memory = dist.all_gather_object(peak_memory_bytes())  # per rank, before the final save
        return last

    def _after_step(self, scalars: dict[str, float]) -> None:
        """Log; stop on a non-finite streak; checkpoint and evaluate on schedule; stop with a checkpoint when
        preempted."""
        if self.first_scalars is None:
            self.first_scalars = scalars
        self.monitor.step(self.step, scalars)
        if self.consecutive_bad >= self.cfg.train.max_nonfinite:
            path = self.save_checkpoint()
            raise FloatingPointError(
                f"{self.consecutive_bad} optimizer steps in a row had a non-finite loss term or gradient (step "
                f"{self.step}; DeepSpeed's own overflow skips so far: {self.ds_skipped}); "
                f"stopped with a checkpoint at {path}. Lower train.lr, check the data, or raise "
                "train.max_nonfinite.")
        if self.cfg.train.save_every and self.step % self.cfg.train.save_every == 0:
            self.save_checkpoint()
        if self.cfg.eval.enabled and self.cfg.eval.due(self.step, self.steps_per_epoch):
            self.evaluate()
        self.hooks.after_step(self)
        if self.preempted:  # every rank saw the flag in the step's all-reduce: stop together
            path = self.save_checkpoint()
            raise Preempted(f"preempted at step {self.step}; checkpoint {path}; rerun the same command "
                            "(or let SLURM requeue it) to resume")

    def evaluate(self) -> dict:
        """The run's evaluator on the model being trained (every rank; examples split and merged); metrics go to
        TensorBoard as ``eval/<name>`` and the evaluator writes its JSONs to ``<output_dir>/eval/step_<N>``."""
        summary = self.evaluator(self.engine, self.tokenizer, step=self.step,
                                 out_dir=os.path.join(self.out_dir, "eval", checkpoint.tag_for(self.step)))
        self.last_eval = {"step": self.step, "metrics": summary}
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
                "method": self.method.name, "hp": dict(self.hp),
                "config": asdict(self.cfg), "config_changes": self.config_changes}

    def save_checkpoint(self) -> str:
        return checkpoint.save(self.engine, self.ckpt_root, self.step, self.client_state(), self.cfg.train.keep_last,
                               protect_before=self.streak_start)  # the last state before a NaN streak stays

    def save_model(self, out: str | None = None) -> str:
        """The final model as a normal HF dir (safetensors + tokenizer), written to a temp dir then renamed, and its
        model card (README.md, palu_ds.card).

        ZeRO-3 weights are gathered (16-bit when trained in 16-bit, else fp32); LoRA adapters are merged into the
        base weights so the dir loads with plain ``from_pretrained``."""

        out = out or os.path.join(self.out_dir, "model")
        self.hooks.before_save_model(self)
        module, state = self._final_state()
        if dist.is_main():
            with atomic_path(out) as tmp:
                module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
                self.tokenizer.save_pretrained(tmp)
            write_card(out, run_info(self.run, self.datasets, steps=self.step, world_size=self.world,
                                     skipped_steps=self.skipped, final=self.last_scalars, spans=self.span_info,
                                     evaluation=self.last_eval))  # after the model is in place: a warning at worst
        dist.barrier()
        self.model_dir = out
        return out

    def _final_state(self):
        """``(module, state_dict)`` to save: every rank takes part in the gathers; rank 0 gets the full state."""
        import deepspeed

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
        return module, state

    def summary(self) -> dict:
        """The run's record, written by rank 0 to ``<output_dir>/summary.json`` (atomically) and returned on every
        rank: steps, first/last scalars, the saved model, skipped steps, world size, peak memory per rank, the span
        report, whether the forward ran padding-free, and the seconds and tokens of each step."""
        data = {"steps": self.step, "first": self.first_scalars, "last": self.last_scalars,
                "model": self.model_dir, "skipped_steps": self.skipped, "world_size": self.world,
                "padding_free": self.padding_free,
                "deepspeed_skipped_steps": self.ds_skipped,
                "peak_memory_bytes_per_rank": self.peak_memory, "spans": self.span_info,
                "config_changes": self.config_changes,
                "step_seconds": [round(t, 5) for t, _ in self.step_times],
                "step_tokens": [n for _, n in self.step_times]}
        self.monitor.summary(data)
        if self.rank == 0:
            write_json(os.path.join(self.out_dir, "summary.json"), data)
            log.info("done: %d steps, final %s; model: %s; tensorboard: %s", self.step,
                     " ".join(f"{k}={v:.4g}" for k, v in self.last_scalars.items() if k.startswith(("loss/", "dual/"))),
                     data["model"], self.cfg.log.tensorboard_dir)
        return data

    def cleanup(self) -> None:
        self.monitor.close()
        dist.barrier()
