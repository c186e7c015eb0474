"""The LM head exactly as the model's own forward applies it -- the one place that knows an architecture's head.

The engine's answer-only path (``train.answer_only_logits``) does not let the model form logits: it takes the last
hidden states and calls the head itself on the answer positions only.  Some causal LMs do more than ``W h + b``
after (or before) their head; the head path must do the same or the training logits differ from the model's.
What transformers 5.24's ``*ForCausalLM.forward`` do (read from their source):

* Gemma-2/3/3n/4, VaultGemma, NanoChat, Beam: ``z = cap * tanh(z / cap)`` with ``config.final_logit_softcapping``
  (RecurrentGemma: ``config.logits_soft_cap``);
* Cohere, Cohere2, Cohere2-MoE, Cohere-Compass: ``z = z * config.logit_scale``;
* Granite (and its MoE / SWA / hybrid variants): ``z = z / config.logits_scaling``; HyperCLOVAX:
  ``z = z * config.logits_scaling``; Falcon-H1: ``z = z * config.lm_head_multiplier``;
* MiniCPM3: ``h = h / config.logits_scaling`` before the head;
* Llama, Qwen2/3, Mistral, Phi, SmolLM, OLMo, ... (the large majority): nothing.

Architectures whose head is something else (a vocabulary slice, a learned soft-cap module, a decoder after the
head, n-gram streams, ...) are refused by name (:data:`REFUSED`); for any other, :func:`verify` compares the head
path with the model's own logits once, on a few tokens, and refuses on a mismatch.  Either way the error says to
set ``train.answer_only_logits: false`` (the model then forms its own full logits).
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from palu_ds.batch import PackedLogits

log = logging.getLogger("palu_ds")

# model_type -> config attribute of the final logit soft-cap ``cap * tanh(z / cap)`` (None in the config = off)
SOFTCAP = {"gemma2": "final_logit_softcapping", "gemma3_text": "final_logit_softcapping",
           "gemma3n_text": "final_logit_softcapping", "gemma4_text": "final_logit_softcapping",
           "gemma4_unified_text": "final_logit_softcapping", "vaultgemma": "final_logit_softcapping",
           "nanochat": "final_logit_softcapping", "beam": "final_logit_softcapping",
           "recurrent_gemma": "logits_soft_cap"}
# model_type -> (config attribute, power): logits *= attr ** power
SCALE = {"cohere": ("logit_scale", 1), "cohere2": ("logit_scale", 1), "cohere2_moe": ("logit_scale", 1),
         "cohere_compass_text": ("logit_scale", 1),
         "granite": ("logits_scaling", -1), "granite_swa": ("logits_scaling", -1), "granitemoe": ("logits_scaling", -1),
         "granitemoe_swa": ("logits_scaling", -1), "granitemoehybrid": ("logits_scaling", -1),
         "granitemoeshared": ("logits_scaling", -1), "hyperclovax": ("logits_scaling", 1),
         "falcon_h1": ("lm_head_multiplier", 1)}
# model_type -> (config attribute, power): hidden *= attr ** power before the head
HIDDEN_SCALE = {"minicpm3": ("logits_scaling", -1)}
REFUSED = {
    "inkling_text": "divides the hidden states by a muP multiplier and slices the padded vocabulary",
    "inkling2_text": "applies a learned soft-cap module after the head",
    "gemma4_assistant": "projects and masks the hidden states with ordered embeddings",
    "gemma4_unified_assistant": "projects and masks the hidden states with ordered embeddings",
    "prophetnet": "predicts n-gram streams",
    "clvp_decoder": "applies a final norm inside the causal-LM head",
    "modernbert-decoder": "runs a decoder layer after the head",
    "electra": "runs a generator projection before the head",
    "xlstm": "has no logits_to_keep head and chunks its inference logits",
    "cpmant": "scales its logits inside the base model",
}


class UnsupportedHead(ValueError):
    """The answer-only head cannot reproduce this architecture's logits."""


def accepts_logits_to_keep(model) -> bool:
    """Whether the (base) model's forward takes ``logits_to_keep`` (most transformers causal LMs do): the model then
    forms logits for the last ``k`` positions only."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def _what_to_do() -> str:
    return "set train.answer_only_logits: false (the model then forms its own full logits)"


@dataclass(frozen=True)
class HeadSpec:
    """How one architecture turns last hidden states into logits: ``post(head(h * hidden_scale))`` with
    ``post(z) = softcap(z * scale)``, ``softcap(z) = cap * tanh(z / cap)`` (identity when ``softcap`` is None)."""

    arch: str
    scale: float = 1.0
    softcap: float | None = None
    hidden_scale: float = 1.0

    def prepare(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden if self.hidden_scale == 1.0 else hidden * self.hidden_scale

    def post(self, logits: torch.Tensor) -> torch.Tensor:
        """What the model applies after its head (same operations, same order as its forward)."""
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def unwrap(model):
    """The module inside a DeepSpeed engine; any other model as it is."""
    return model.module if hasattr(model, "module") and hasattr(model, "backward") else model


def base_config(model):
    """The transformers config of ``model``, unwrapped from a DeepSpeed engine and a peft model (None without one)."""
    module = unwrap(model)
    base = module.get_base_model() if hasattr(module, "get_base_model") else module  # peft
    return getattr(base, "config", None)


@contextmanager
def probe(model, shape: tuple[int, ...]):
    """Token ids of ``shape`` spread over ``model``'s vocabulary, on its device, for a check forward (the start-up
    self-checks: :func:`verify`, palu_ds.packing.verify): inside, the model is in eval mode with the RNG state forked,
    so dropout cannot make two forwards differ and training is not perturbed; its mode is restored after."""
    module = unwrap(model)
    vocab = int(getattr(base_config(module), "vocab_size", 0) or output_head(module).weight.shape[0])
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    n = math.prod(shape)
    ids = (torch.arange(n, device=device) * 7919 % max(1, vocab - 1) + 1).view(shape)
    was_training = module.training
    module.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            yield ids
    finally:
        module.train(was_training)


def head_spec(model) -> HeadSpec:
    """The :class:`HeadSpec` of a (possibly peft-wrapped) transformers causal LM; :class:`UnsupportedHead` for an
    architecture in :data:`REFUSED`."""
    cfg = base_config(model)
    arch = getattr(cfg, "model_type", None) or type(model).__name__
    if arch in REFUSED:
        raise UnsupportedHead(f"architecture {arch!r} {REFUSED[arch]}: the answer-only LM head cannot reproduce its "
                              f"logits; {_what_to_do()}")
    kw = {}
    if arch in SOFTCAP and getattr(cfg, SOFTCAP[arch], None) is not None:
        kw["softcap"] = float(getattr(cfg, SOFTCAP[arch]))
    if arch in SCALE:
        attr, power = SCALE[arch]
        kw["scale"] = float(getattr(cfg, attr)) ** power
    if arch in HIDDEN_SCALE:
        attr, power = HIDDEN_SCALE[arch]
        kw["hidden_scale"] = float(getattr(cfg, attr)) ** power
    return HeadSpec(arch, **kw)


def output_head(model) -> torch.nn.Module:
    """The output layer of a causal LM (peft-wrapped or a DeepSpeed engine); a bare ``nn.Linear`` is its own head."""
    if isinstance(model, torch.nn.Linear):
        return model
    base = model.module if hasattr(model, "module") and not hasattr(model, "get_output_embeddings") else model
    head = base.get_output_embeddings()
    if head is None:
        raise UnsupportedHead(f"{type(base).__name__} has no output embeddings (get_output_embeddings() is None); "
                              f"{_what_to_do()}")
    return head


def lm_logits(model, hidden: torch.Tensor, spec: HeadSpec | None = None) -> torch.Tensor:
    """The model's own logits from its last hidden states ``hidden`` [..., d] (any subset of positions)."""
    spec = spec or head_spec(model)
    return spec.post(output_head(model)(spec.prepare(hidden)))


@torch.no_grad()
def verify(model, spec: HeadSpec | None = None, n_tokens: int = 8, atol: float = 1e-4, rtol: float = 1e-3) -> float:
    """Check the head path against the model's own forward on ``n_tokens`` tokens; returns the max abs difference.

    Both come from ONE forward (``output_hidden_states=True``, full logits), in eval mode and with the RNG state
    restored, so dropout cannot make them differ and training is not perturbed.  Every rank must call it (ZeRO-3
    gathers inside).  Raises :class:`UnsupportedHead` naming the architecture on a mismatch.
    """
    spec = spec or head_spec(model)
    with probe(model, (1, n_tokens)) as ids:
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
        want = out.logits.float()
        got = lm_logits(unwrap(model), out.hidden_states[-1], spec).float()
    diff = (got - want).abs().max().item() if got.shape == want.shape else float("inf")
    if not (got.shape == want.shape and torch.allclose(got, want, atol=atol, rtol=rtol)):
        raise UnsupportedHead(f"architecture {spec.arch!r}: the answer-only LM head gives logits that differ from "
                              f"the model's own forward (max |diff| {diff:.3g}, shapes {tuple(got.shape)} vs "
                              f"{tuple(want.shape)}); {_what_to_do()}")
    return diff


def start_answer_only(model, wanted: bool) -> bool:
    """Whether the reference's forwards form logits at answer positions only (``train.answer_only_logits`` =
    ``wanted``): through the model's own ``logits_to_keep`` given a boolean mask (transformers'
    ``slice_logits_to_keep``: the head runs on the kept positions' hidden states only, the architecture's soft-cap or
    scale applied by its own forward), checked once on a probe against the model's full logits. A model whose
    forward takes no ``logits_to_keep`` keeps its full logits, with a warning (as training does); one that takes it
    but does not give the kept rows is a ConfigError naming ``train.answer_only_logits: false``. Every rank must call
    it (ZeRO-3 gathers inside)."""
    if not wanted:
        return False
    module = unwrap(model)
    if not accepts_logits_to_keep(module):
        log.warning("train.answer_only_logits: %s.forward takes no logits_to_keep; the reference forms full logits",
                    type(module).__name__)
        return False
    with torch.no_grad(), probe(model, (2, 6)) as ids:
        keep = torch.zeros_like(ids, dtype=torch.bool)
        keep[0, 1:4] = keep[1, 2] = True
        want = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[keep].float()
        try:
            why = _kept_rows_problem(model(input_ids=ids, attention_mask=torch.ones_like(ids),
                                           logits_to_keep=keep).logits.float(), want)
        except (TypeError, ValueError, IndexError, RuntimeError) as e:
            why = f"its forward refused a boolean logits_to_keep ({type(e).__name__}: {e})"
    if why is None:
        return True
    from palu_ds.config import ConfigError

    raise ConfigError(f"train.answer_only_logits: {type(module).__name__} cannot form logits at answer positions "
                      f"only: {why}; {_what_to_do()}")


def _kept_rows_problem(got: torch.Tensor, want: torch.Tensor) -> str | None:
    """Why the rows a forward kept (``got``) are not the full logits' rows at those positions (``want``); None when
    they agree (to fp32 rounding of the same products)."""
    if got.shape != want.shape:
        return f"its forward gave logits of shape {tuple(got.shape)} for {tuple(want.shape)} kept positions"
    if not torch.allclose(got, want, atol=1e-4, rtol=1e-3):
        return f"its kept rows differ from its full logits (max |diff| {(got - want).abs().max().item():.3g})"
    return None


# ----------------------------------------------------------------------------------------------------------------
# Chunked head + losses: never the [positions x vocabulary] logits (issues 17, 29)
# ----------------------------------------------------------------------------------------------------------------
def chunk_rows(vocab: int, chunk_elems: int) -> int:
    """Positions per chunk so that one chunk's logits hold at most ``chunk_elems`` elements (at least 1 row)."""
    return max(1, int(chunk_elems) // max(1, int(vocab)))


#: the two values the plan's probe gives every per-row output: a job whose seeds agree at both is linear there
PROBE_VALUES = (0.0, 1.0)
#: a fused job's row is corrected in backward when its gradient differs from ``scale * seed`` by more than this
#: many units of the gradient's precision (relative): below it the difference is rounding of the same products
SEED_TOLERANCE_ULPS = 64


class ChunkedHead:
    """The head applied to a set of packed hidden rows, one chunk of positions at a time, for any number of per-row
    functions (the terms of a step); their backward shares ONE pass and ONE head-gradient buffer.

    Each :meth:`rows` call is a *job*: ``fn(post(head(h_c)), *args_c)`` per chunk ``c``, the chunk's logits freed
    before the next chunk; every job's output hangs on one :class:`_Anchor` node (inputs: the packed hidden rows,
    the weight, the bias) whose backward autograd runs once, after every job the loss reaches.  A job runs one of
    two ways:

    * **fused** (issue 29: the gradient in the forward pass, as Liger-Kernel's fused linear cross-entropy does):
      when :meth:`plan` gave the job a *seed* -- the gradient of the step's objective w.r.t. each of its per-row
      outputs, known before the logits exist because the term reduces the rows linearly (a sum over a global
      count, weighted by the objective's gamma / alpha / lambda).  Per chunk it forms ``lin = h_c W^T + b`` as a
      leaf, ``out = fn(post(lin))`` and, by one local autograd call, ``J = d out / d lin`` (row i of ``out``
      depends on row i of ``lin`` only, so one call gives every row's Jacobian); it keeps ``u = hidden_scale * J W``
      (one [d] vector per row) and adds ``J^T (seed * h_c)`` to one [V, d] buffer (``seed^T J`` to the bias's).
      Backward only scales: ``dh = grad * u`` exactly, whatever ``grad`` arrives; ``dW = scale * buffer``, where
      ``scale`` is the one factor that maps the seeds to the gradients that arrived (e.g. the engine's
      ``world * gas``).  A row whose gradient is not ``scale * seed`` (a loss changed after the terms, a term left
      out of it) gets the difference by the recompute below, so the result is exact in every case.  Three head
      matmuls, as the dense path.
    * **recomputed** (jobs without a seed: a term that weighs each row by a factor of the values themselves, as
      NPO / SimNPO / DPO do per sequence; any call outside :func:`within_head`): forward computes ``out`` only;
      backward records each job's gradient and recomputes its chunks (``dlin = d(out . g_c)/dlin`` by autograd)
      into ``dh_c = hidden_scale * dlin W`` and ``dW += dlin^T h_c`` (``db += sum dlin``).  One head matmul more
      than the dense path.

    Either way ``fn``'s math lives once, in palu_ds.losses.  Memory: O(rows x d) saved, one chunk's logits and
    their autograd temporaries, one [V, d] gradient -- never O(positions x V).  ``stats()``: rows fused and rows
    recomputed so far.
    """

    def __init__(self, packed: torch.Tensor, head: torch.nn.Module, spec: HeadSpec, chunk_elems: int,
                 fuse: bool = True):
        self.packed, self.head, self.spec, self.chunk_elems, self.fuse = packed, head, spec, chunk_elems, fuse
        # what the anchor's backward needs, without a reference back to this object (which holds the anchor
        # tensor): no reference cycle through the autograd graph
        self.state = SimpleNamespace(jobs=[], fused=[], gw=None, gb=None, spec=spec, chunk_elems=chunk_elems,
                                     fused_rows=0, recomputed_rows=0)
        self.anchor = None
        self.seeds, self.calls, self.probe = None, 0, None

    @property
    def jobs(self) -> list:
        return self.state.jobs

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.head, "bias", None)

    def stats(self) -> dict:
        """Rows computed with their gradient in the forward pass, and rows whose logits backward recomputed."""
        return {"fused_rows": self.state.fused_rows, "recomputed_rows": self.state.recomputed_rows}

    def logits(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _head_logits(self.spec, h, weight, bias)

    def _needs_grad(self) -> bool:
        params = [t for t in (self.packed, self.weight, self.bias) if t is not None]
        return torch.is_grad_enabled() and any(t.requires_grad for t in params)

    def plan(self, run) -> None:
        """Seed the jobs of the pass ``run()`` will make (``run`` calls :meth:`rows` and returns the scalar to
        back-propagate, e.g. the step's objective).  It runs ``run`` twice without the head: every :meth:`rows` call
        returns a probe (a leaf of ``PROBE_VALUES[i]`` per row), and autograd gives the gradient of the scalar
        w.r.t. each probe.  A job whose gradients agree at both probes (the scalar is linear in its outputs there)
        and are not all zero gets them as its seed: the next pass's calls of :meth:`rows`, in the same order, run
        fused; the others are recomputed.  Seeds that turn out wrong cost a recompute, never exactness."""
        self.seeds, self.calls = None, 0
        if not (self.fuse and self._needs_grad()):
            return
        found = []
        for value in PROBE_VALUES:
            self.probe = (value, [])
            try:
                with torch.enable_grad():
                    out = run()
            finally:
                leaves, self.probe = self.probe[1], None
            used = torch.is_tensor(out) and out.requires_grad and bool(leaves)
            grads = torch.autograd.grad(out, leaves, allow_unused=True) if used else [None] * len(leaves)
            found.append([torch.zeros_like(p) if g is None else g.detach() for p, g in zip(leaves, grads)])
        first, second = found
        if len(first) == len(second):
            self.seeds = [a if a.shape == b.shape and bool(a.any()) and torch.equal(a, b) else None
                          for a, b in zip(first, second)]

    def rows(self, index, fn, *row_args: torch.Tensor) -> torch.Tensor:
        """``fn(logits[index], *row_args)`` for the packed rows ``index`` (a slice or a LongTensor); ``fn`` returns
        one value per row."""
        n = self.packed[index].shape[0]
        for a in row_args:
            if a.shape[0] != n:
                raise ValueError(f"per-row argument has {a.shape[0]} rows for {n} positions")
            if a.requires_grad:
                raise ValueError("chunked head: per-row arguments are constants (reference tensors, ids); "
                                 "gradients flow only to the hidden states and the head")
        if self.probe is not None:
            value, leaves = self.probe
            dtype = torch.float64 if self.packed.dtype == torch.float64 else torch.float32
            leaves.append(torch.full((n,), value, dtype=dtype, device=self.packed.device, requires_grad=True))
            return leaves[-1]
        seed = None
        if self.seeds is not None:
            call, self.calls = self.calls, self.calls + 1
            if call < len(self.seeds) and self.seeds[call] is not None and self.seeds[call].shape[0] == n:
                seed = self.seeds[call]
        if not self._needs_grad():
            return _Job.forward(None, None, self, index, fn, None, *row_args)
        if self.anchor is None:
            self.anchor = _Anchor.apply(self.state, self.packed, self.weight, self.bias)
        return _Job.apply(self.anchor, self, index, fn, seed, *row_args)

    def _chunks(self, index):
        return _chunks(self.packed[index], chunk_rows(self.weight.shape[0], self.chunk_elems))

    def _fused(self, index, fn, seed: torch.Tensor, args) -> tuple[torch.Tensor, SimpleNamespace]:
        """A seeded job's forward: its outputs, its rows' ``u``, and its seeded share of the head's gradient."""
        st, spec = self.state, self.spec
        w, b = self.weight.detach(), None if self.bias is None else self.bias.detach()
        need_h, need_w = self.packed.requires_grad, self.weight.requires_grad
        need_b = self.bias is not None and self.bias.requires_grad
        acc = _accumulator_dtype(w.dtype)
        if need_w and st.gw is None:
            st.gw = torch.zeros(w.shape, dtype=acc, device=w.device)
        if need_b and st.gb is None:
            st.gb = torch.zeros(b.shape, dtype=acc, device=b.device)
        outs, us = [], []
        for s, e, h in self._chunks(index):
            h = h.detach()
            with torch.enable_grad():
                lin = _head_logits(spec, h, w, b).requires_grad_(True)
                out = fn(spec.post(lin), *(a[s:e] for a in args))
                if out.shape != (e - s,):
                    raise ValueError(f"chunked head: a per-row function returns one value per row, got shape "
                                     f"{tuple(out.shape)} for {e - s} rows")
                (dlin,) = torch.autograd.grad(out, lin, torch.ones_like(out), allow_unused=True)
            outs.append(out.detach())
            if dlin is None:
                dlin = torch.zeros_like(lin)
            sc = seed[s:e].to(acc)
            if need_w:
                st.gw.addmm_(dlin.T.to(acc), spec.prepare(h).to(acc) * sc[:, None])
            if need_b:
                st.gb.add_(sc @ dlin.to(acc))
            if need_h:
                us.append(dlin.to(w.dtype) @ w)
        u = None
        if need_h:
            u = torch.cat(us) if len(us) > 1 else us[0]
            u = u * spec.hidden_scale if spec.hidden_scale != 1.0 else u
        st.fused_rows += len(seed)
        record = SimpleNamespace(index=index, fn=fn, args=args, seed=seed, u=u, grad=None)
        st.fused.append(record)
        return (torch.cat(outs) if len(outs) > 1 else outs[0]), record


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the head's gradient is summed in over the chunks: float32 for half / bfloat16 weights."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _chunks(h: torch.Tensor, step: int):
    for s in range(0, max(1, h.shape[0]), step):
        yield s, min(s + step, h.shape[0]), h[s:s + step]


def _head_logits(spec: HeadSpec, h, weight, bias) -> torch.Tensor:
    return torch.nn.functional.linear(spec.prepare(h), weight, bias)


def _row_ids(n: int, index, device) -> torch.Tensor:
    return torch.arange(n, device=device)[index]


class _Job(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, head, index, fn, seed, *args):
        if ctx is not None and seed is not None:
            out, ctx.record = head._fused(index, fn, seed, args)
            return out
        with torch.no_grad():
            outs = [fn(head.spec.post(head.logits(h, head.weight, head.bias)), *(a[s:e] for a in args))
                    for s, e, h in head._chunks(index)]
        if ctx is not None:
            ctx.job, ctx.record = (head.state, index, fn, args), None
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    @staticmethod
    def backward(ctx, grad):
        if ctx.record is not None:  # fused: the anchor's backward scales what the forward stored
            ctx.record.grad, ctx.record = grad, None
        else:
            state, index, fn, args = ctx.job
            ctx.job = None
            state.jobs.append((index, fn, args, grad))
        return (torch.zeros((), device=grad.device), None, None, None, None, *(None for _ in ctx.needs_input_grad[5:]))


def _common_scale(fused: list) -> float:
    """The factor that maps the fused jobs' seeds to the gradients that arrived, chosen (among each job's ratio at
    its largest seed) to leave the fewest rows to correct; 1 when no job has a gradient."""
    pairs = [(r.seed.double(), (r.grad if r.grad is not None else torch.zeros_like(r.seed)).double()) for r in fused]
    candidates = [float(g[s.abs().argmax()] / s[s.abs().argmax()]) for s, g in pairs if s.any()]
    return min(candidates or [1.0], key=lambda a: sum(int(_off_rows(s, g, a).sum()) for s, g in pairs))


def _off_rows(seed: torch.Tensor, grad: torch.Tensor, scale: float) -> torch.Tensor:
    """Rows whose gradient is not ``scale * seed`` up to rounding (NaN counts as off)."""
    want = seed * scale
    tol = SEED_TOLERANCE_ULPS * torch.finfo(torch.float32 if grad.dtype != torch.float64 else grad.dtype).eps
    return ~((grad - want).abs() <= tol * torch.maximum(grad.abs(), want.abs()))


class _Anchor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, state, packed, weight, bias):
        ctx.state = state
        ctx.save_for_backward(packed, weight, bias)
        return packed.new_zeros(())

    @staticmethod
    def backward(ctx, _):
        state = ctx.state
        packed, weight, bias = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[1:4]
        need_b = need_b and bias is not None
        acc = _accumulator_dtype(weight.dtype)
        gh = torch.zeros_like(packed) if need_h else None
        gw, gb, state.gw, state.gb = state.gw, state.gb, None, None
        fused, state.fused = state.fused, []
        jobs, state.jobs = state.jobs, []
        # (rows, fn, args, gradient, whether dh is still to do): the recorded jobs, then the fused rows to correct
        redo = [(_row_ids(packed.shape[0], index, packed.device), fn, args, grad, True)
                for index, fn, args, grad in jobs]
        if fused:
            scale = _common_scale(fused)
            for t in (gw, gb):
                if t is not None and scale != 1.0:
                    t.mul_(scale)
            for r in fused:
                grad = r.grad if r.grad is not None else torch.zeros_like(r.seed)
                rows = _row_ids(packed.shape[0], r.index, packed.device)
                if gh is not None and r.u is not None:
                    gh.index_add_(0, rows, (grad[:, None].to(r.u.dtype) * r.u).to(packed.dtype))
                off = _off_rows(r.seed.double(), grad.double(), scale)
                if off.any():
                    sel = off.nonzero().squeeze(-1)
                    rest = grad.double()[sel] - scale * r.seed.double()[sel]
                    redo.append((rows[sel], r.fn, tuple(a[sel] for a in r.args), rest.to(grad.dtype), False))
        if need_w and gw is None:
            gw = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        if need_b and gb is None:
            gb = torch.zeros(bias.shape, dtype=acc, device=bias.device)
        w, b = weight.detach(), None if bias is None else bias.detach()
        spec = state.spec
        hs = spec.hidden_scale
        step = chunk_rows(weight.shape[0], state.chunk_elems)
        for rows, fn, args, grad, with_h in redo:
            if not bool(grad.any()):  # nothing to add (NaN counts as something)
                continue
            state.recomputed_rows += len(rows)
            for s, e, h in _chunks(packed.detach()[rows], step):
                with torch.enable_grad():
                    lin = _head_logits(spec, h, w, b).requires_grad_(True)
                    out = fn(spec.post(lin), *(a[s:e] for a in args))
                    (dlin,) = torch.autograd.grad(out, lin, grad[s:e].to(out.dtype), allow_unused=True)
                if dlin is None:
                    continue
                if gh is not None and with_h:
                    d = dlin.to(weight.dtype) @ w
                    gh.index_add_(0, rows[s:e], (d * hs if hs != 1.0 else d).to(packed.dtype))
                if need_w:
                    gw.addmm_(dlin.T.to(acc), spec.prepare(h).to(acc))
                if need_b:
                    gb += dlin.sum(0).to(acc)
        return (None, gh, None if not need_w else gw.to(weight.dtype), None if not need_b else gb.to(bias.dtype))


def chunked_rows(fn, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: HeadSpec,
                 chunk_elems: int, *row_args: torch.Tensor) -> torch.Tensor:
    """``fn(post(hidden W^T + b), *row_args)`` with at most ``chunk_elems`` logits alive at a time (forward and
    backward); same values and gradients as the dense form up to rounding.  ``fn`` must be per-row: row ``i`` of its
    output depends only on row ``i`` of its inputs (every per-position loss of palu_ds.losses is).  Nothing is known
    of the gradient that will arrive, so backward recomputes (:class:`ChunkedHead`)."""
    head = SimpleNamespace(weight=weight, bias=bias)  # what ChunkedHead reads of a head module
    return ChunkedHead(hidden, head, spec, chunk_elems).rows(slice(None), fn, *row_args)


def _zero_rows(z: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(z).sum(-1) * 0.0


class ChunkedLogits(PackedLogits):
    """Stands where :class:`palu_ds.batch.PackedLogits` does (same ``answer`` mask, same row order), but holds the
    last hidden states of the answer positions and the head instead of their logits.  The methods evaluate every
    term through :meth:`map_rows` (:func:`palu_ds.losses.map_rows`), which runs :class:`ChunkedHead`: the V-wide
    logits exist one chunk at a time.  Indexing it (``self[mask]``) is refused: that would form them all.
    The batches of one step share one :class:`ChunkedHead` (``head``) over their packed rows ``[start, stop)``."""

    def __init__(self, chunked: ChunkedHead, start: int, stop: int, answer: torch.Tensor):  # noqa: D107 (no rows)
        if stop - start != int(answer.sum()):
            raise ValueError(f"{stop - start} hidden rows for {int(answer.sum())} answer positions")
        self.chunked, self.start, self.stop, self.answer = chunked, start, stop, answer

    @property
    def hidden(self) -> torch.Tensor:
        return self.chunked.packed[self.start:self.stop]

    @property
    def device(self) -> torch.device:
        return self.chunked.packed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.chunked.packed.dtype

    def __getitem__(self, mask):
        raise TypeError("ChunkedLogits never forms the V-wide logits; evaluate per-row functions with "
                        "palu_ds.losses.map_rows(logits, mask, fn, *row_args)")

    def _index(self, mask: torch.Tensor):
        if mask is self.answer:
            return slice(self.start, self.stop)
        if mask.shape != self.answer.shape or mask.dtype != torch.bool:
            raise TypeError("ChunkedLogits is indexed by a boolean mask over the shifted positions")
        if (mask & ~self.answer).any():
            raise ValueError("mask selects positions without an answer label: their hidden states were not kept")
        sel = mask[self.answer]
        return slice(self.start, self.stop) if bool(sel.all()) else self.start + sel.nonzero().squeeze(-1)

    def map_rows(self, mask: torch.Tensor, fn, *row_args: torch.Tensor) -> torch.Tensor:
        """``fn(logits[mask], *row_args)`` computed chunk by chunk from the hidden states."""
        return self.chunked.rows(self._index(mask), fn, *row_args)

    def zero_loss(self) -> torch.Tensor:
        """A zero attached to the graph through the head and every row, as the dense path's (the engine's loss for
        a skipped, non-finite step; under ZeRO-3 call it inside :func:`within_head`)."""
        return self.map_rows(self.answer, _zero_rows).sum()


def chunked_logits(head: torch.nn.Module, spec: HeadSpec, packed: torch.Tensor, answers: dict,
                   chunk_elems: int, fuse: bool = True) -> dict:
    """One :class:`ChunkedLogits` per batch over the step's packed hidden rows (batches in ``answers`` order), all
    sharing one :class:`ChunkedHead` (``fuse=False``: every job recomputed in backward, the issue-17 path)."""
    if not isinstance(head, torch.nn.Linear) or hasattr(head, "lora_A"):
        raise UnsupportedHead(f"the chunked LM head needs a plain linear output layer, got {type(head).__name__} "
                              "(a LoRA adapter on the head?); set train.head_path: dense or leave the head out of "
                              "model.lora.target_modules")
    chunked = ChunkedHead(packed, head, spec, chunk_elems, fuse)
    out, start = {}, 0
    for name, answer in answers.items():
        stop = start + int(answer.sum())
        out[name] = ChunkedLogits(chunked, start, stop, answer)
        start = stop
    return out


def run_inside(module: torch.nn.Module, fn, *inputs):
    """``fn(*inputs)`` run as ``module``'s forward, so that hooks on ``module`` wrap it: under ZeRO-3 the head's
    parameters are gathered ONCE before ``fn`` (not per chunk, not per term), released after it, gathered once again
    before ``fn``'s backward (DeepSpeed's pre-backward hook on the outputs) and released after it.  Without hooks it
    is a plain call."""
    had = "forward" in module.__dict__
    old = module.__dict__.get("forward")
    module.forward = fn
    try:
        return module(*inputs)
    finally:
        if had:
            module.forward = old
        else:
            del module.forward


def within_head(logits: dict, fn, objective=None):
    """``fn(logits)`` -- for :class:`ChunkedLogits`, inside one call of their head module (:func:`run_inside`),
    over a fresh :class:`ChunkedHead` whose hidden rows are that call's input.

    ``objective(fn(logits))`` is the scalar that will be back-propagated (default: the sum of ``fn``'s values, or
    ``fn``'s tensor itself); :meth:`ChunkedHead.plan` probes it to seed the jobs whose rows it weighs linearly, and
    those run fused (gradient in the forward pass).  A different loss in the end is still exact (corrected in
    backward), only slower."""
    chunked = [v for v in logits.values() if isinstance(v, ChunkedLogits)]
    if not chunked:
        return fn(logits)
    old = chunked[0].chunked

    def inner(packed):
        new = ChunkedHead(packed, old.head, old.spec, old.chunk_elems, old.fuse)
        lg = {n: ChunkedLogits(new, v.start, v.stop, v.answer) if isinstance(v, ChunkedLogits) else v
              for n, v in logits.items()}
        new.plan(lambda: _scalar(fn(lg), objective))
        return fn(lg)

    return run_inside(old.head, inner, old.packed)


def _scalar(result, objective=None) -> torch.Tensor:
    if objective is not None:
        return objective(result)
    return sum(result.values()) if isinstance(result, dict) else result
