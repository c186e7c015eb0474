"""Prompt formatting, the one definition for training, the reference precompute and evaluation.

Two formats, chosen by :class:`PromptFormat` (``data.prompt`` in a run config, the same fields in an evaluation):

* **chat** -- exactly as open-unlearning formats QA for instruct models (``src/data/utils.py:
  preprocess_chat_instance``), so a model it trained is scored on the same tokens: the messages are
  ``[system (when system_prompt is set)], user=question, assistant=answer``; the whole conversation is rendered by
  the tokenizer's chat template (``add_generation_prompt=False``, ``date_string`` passed to templates that print a
  date), the prompt is the conversation without the answer rendered with ``add_generation_prompt=True``; the
  answer tokens are everything after the prompt's tokens (the answer directly after the generation prompt, no
  leading space, then whatever the template writes after a turn: ``<|eot_id|>`` for Llama-3,
  ``<|im_end|>`` + newline for ChatML/SmolLM2), and EOS is appended when that does not already end in EOS (as
  open-unlearning does). Template tokens come out as the template writes them: no BOS is added or removed.
* **plain** -- ``Question: {question}\\nAnswer:`` with BOS exactly once, then ``" " + answer`` and EOS (models
  without a chat template, e.g. the tiny test model).

``chat_template: null`` (default, "auto") takes chat when the tokenizer has a template, else plain; ``true``
requires one (an error names the tokenizer otherwise); ``false`` is always plain. ``date_string`` is fixed (open-unlearning's
"10 Apr 2025") so a prompt -- and the reference cache key, which includes :func:`prompt_format_id` -- does not
change from day to day.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

PLAIN_TEMPLATE = "Question: {question}\nAnswer:"


@dataclass(frozen=True)
class PromptFormat:
    chat_template: bool | None = field(default=None, metadata={"help": "null: the chat template when the tokenizer "
                                       "has one; true: required; false: plain 'Question: ...\\nAnswer:'"})
    system_prompt: str | None = field(default="You are a helpful assistant.", metadata={
        "help": "the system message; null: none (the template's default)"})
    date_string: str | None = field(default="10 Apr 2025", metadata={
        "help": "for templates that print a date (Llama-3); null: the template decides"})


DEFAULT_FORMAT = PromptFormat()


class PromptFormatError(ValueError):
    """A chat template was required but the tokenizer has none."""


def uses_chat(tokenizer, fmt: PromptFormat = DEFAULT_FORMAT) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if fmt.chat_template is True and not has:
        raise PromptFormatError(
            f"chat_template is true but the tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__} "
            "has no chat template (tokenizer_config.json / chat_template.jinja); set chat_template: false (or null) to "
            "use the plain 'Question: ...\\nAnswer:' format, or give a tokenizer with a template")
    return has and fmt.chat_template is not False


def _messages(question: str, answer: str | None, fmt: PromptFormat) -> list[dict]:
    chat = [{"role": "system", "content": fmt.system_prompt}] if fmt.system_prompt else []
    chat.append({"role": "user", "content": question})
    if answer is not None:
        chat.append({"role": "assistant", "content": answer})
    return chat


def _render(tokenizer, chat: list[dict], generation_prompt: bool, fmt: PromptFormat) -> str:
    extra = {"date_string": fmt.date_string} if fmt.date_string is not None else {}
    return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt, **extra)


def _tokens(tokenizer, text: str, offsets: bool = False):
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=offsets)
    return (list(enc["input_ids"]), enc["offset_mapping"]) if offsets else list(enc["input_ids"])


def format_prompt(tokenizer, question: str, fmt: PromptFormat = DEFAULT_FORMAT) -> str:
    """The prompt text for ``question`` (plain format: without BOS, :func:`encode_prompt` adds it)."""
    if uses_chat(tokenizer, fmt):
        return _render(tokenizer, _messages(question, None, fmt), True, fmt)
    return PLAIN_TEMPLATE.format(question=question)


def prompt_format_id(tokenizer, fmt: PromptFormat = DEFAULT_FORMAT) -> str:
    """A string that identifies the prompt format (part of the reference cache key)."""
    if uses_chat(tokenizer, fmt):
        return "chat:" + json.dumps(asdict(fmt), sort_keys=True) + tokenizer.chat_template
    return "plain:" + PLAIN_TEMPLATE


def with_bos(tokenizer, ids: list[int]) -> list[int]:
    """``ids`` starting with exactly one BOS when the tokenizer has a BOS token (a doubled one is collapsed);
    unchanged when it has none (e.g. Qwen). The BOS policy of the plain format and of raw text (training chunks,
    MUSE prompts); chat-formatted prompts keep exactly the template's tokens."""
    ids = list(ids)
    bos = tokenizer.bos_token_id
    if bos is None:
        return ids
    while len(ids) > 1 and ids[0] == bos and ids[1] == bos:
        ids.pop(0)
    return ids if ids and ids[0] == bos else [bos] + ids


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of any raw prompt text with BOS exactly once (:func:`with_bos`) and no EOS."""
    return with_bos(tokenizer, _tokens(tokenizer, text))


def encode_prompt(tokenizer, question: str, fmt: PromptFormat = DEFAULT_FORMAT) -> list[int]:
    """Token ids of the prompt for ``question`` (what generation starts from)."""
    if uses_chat(tokenizer, fmt):
        return _tokens(tokenizer, format_prompt(tokenizer, question, fmt))
    return encode_text(tokenizer, format_prompt(tokenizer, question, fmt))


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; set one (e.g. tokenizer.eos_token = '</s>')")
    return tokenizer.eos_token_id


def encode_pair(tokenizer, question: str, answer: str, fmt: PromptFormat = DEFAULT_FORMAT, add_eos: bool = True
                ) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """``(prefix_ids, answer_ids, offsets)`` of one QA pair: the model reads ``prefix_ids + answer_ids`` and is
    scored on ``answer_ids``; ``offsets[i]`` is answer token i's character span in ``answer`` (tokens outside the
    answer text -- end-of-turn, EOS -- get the empty span ``(len, len)``).

    Chat: the conversation's tokens split at the length of the prompt's tokens, as open-unlearning splits them
    (``prefix_ids`` equals :func:`encode_prompt` unless the tokenizer merges across the prompt/answer boundary;
    generation always starts from :func:`encode_prompt`), EOS appended when missing. Plain: the prompt, then
    ``" " + answer`` and EOS. ``add_eos=False`` leaves out EOS and the template's end-of-turn tokens."""
    n = len(answer)
    if not uses_chat(tokenizer, fmt):
        enc = tokenizer(" " + answer, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), [(max(0, a - 1), max(0, b - 1)) for a, b in enc["offset_mapping"]]
        if add_eos:
            ids.append(_eos_id(tokenizer))
            offsets.append((n, n))
        return encode_prompt(tokenizer, question, fmt), ids, offsets
    prompt_text = format_prompt(tokenizer, question, fmt)
    full_text = _render(tokenizer, _messages(question, answer, fmt), False, fmt)
    prompt = _tokens(tokenizer, prompt_text)
    full, full_offsets = _tokens(tokenizer, full_text, offsets=True)
    start = full_text.find(answer, len(prompt_text)) if full_text.startswith(prompt_text) else -1
    if start < 0:  # a template that rewrites the content (e.g. trims it) -- locate what it kept
        start = full_text.find(answer.strip(), len(prompt_text))
        if start < 0:
            raise ValueError(f"the chat template does not write the answer after the prompt (answer {answer[:60]!r}); "
                             "set data.prompt.chat_template=false to use the plain format")
    prefix, ids = full[:len(prompt)], full[len(prompt):]
    offsets = [(min(max(a - start, 0), n), min(max(b - start, 0), n)) for a, b in full_offsets[len(prompt):]]
    if not add_eos:  # content tokens only: cut what the template writes after the answer
        keep = [i for i, (a, b) in enumerate(offsets) if b > a]
        ids, offsets = ids[:keep[-1] + 1] if keep else [], offsets[:keep[-1] + 1] if keep else []
    elif not ids or ids[-1] != _eos_id(tokenizer):
        ids.append(_eos_id(tokenizer))
        offsets.append((n, n))
    return prefix, ids, offsets


def answer_ids(tokenizer, answer: str, add_eos: bool = True, question: str = "",
               fmt: PromptFormat = DEFAULT_FORMAT) -> list[int]:
    """Token ids of the answer as it follows the prompt (:func:`encode_pair`)."""
    return encode_pair(tokenizer, question, answer, fmt, add_eos)[1]


def encode_qa(tokenizer, question: str, answers: list[str], add_eos: bool = True,
              fmt: PromptFormat = DEFAULT_FORMAT) -> tuple[list[int], list[tuple[list[int], list[int]]]]:
    """``(prompt_ids, [(prefix_ids, answer_ids), ...])`` for one question and several candidate answers (true,
    paraphrased, perturbed; the evaluation suites), tokenized exactly as the training data is (:func:`encode_pair`,
    format ``fmt``): generation starts from ``prompt_ids``; each answer is scored after its ``prefix_ids`` (the same
    ids, unless the tokenizer merges across the prompt/answer boundary). Each answer ends with EOS when ``add_eos``
    (TOFU scores the EOS too)."""
    pairs = [encode_pair(tokenizer, question, a, fmt, add_eos) for a in answers]
    return encode_prompt(tokenizer, question, fmt), [(prefix, ids) for prefix, ids, _ in pairs]
