"""Question formatting and tokenization for QA evaluation (TOFU, MUSE KnowMem).

:func:`format_prompt` is the data package's formatter (palu_ds.data.prompt): training and evaluation format and
tokenize a question and its answers identically.  :func:`encode_prompt` turns any prompt text into
ids with the BOS token exactly once, and :func:`encode_qa` splits prompt and answer ids consistently.
"""

from __future__ import annotations

from palu_ds.data.prompt import DEFAULT_FORMAT, PLAIN_TEMPLATE, PromptFormat, encode_pair, format_prompt  # noqa: F401
from palu_ds.data.prompt import encode_prompt as encode_question  # noqa: F401
from palu_ds.data.prompt import encode_text


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with BOS exactly once when the tokenizer has one (the training data's policy,
    palu_ds.data.prompt.with_bos: never doubled by a chat template that already writes it, never dropped), no EOS."""
    return encode_text(tokenizer, text)


def encode_continuation(tokenizer, prompt_text: str, prompt_ids: list[int], continuation: str) -> list[int]:
    """Ids of ``continuation`` as they follow ``prompt_text``: tokenize ``prompt_text + continuation`` and cut at the
    prompt's length when that prefix is unchanged (so the split matches how a model sees the whole text); if
    tokenization merges across the boundary, tokenize the continuation on its own."""
    full = encode_prompt(tokenizer, prompt_text + continuation)
    if len(full) > len(prompt_ids) and full[: len(prompt_ids)] == prompt_ids:
        return full[len(prompt_ids):]
    return list(tokenizer(continuation, add_special_tokens=False)["input_ids"])


def encode_qa(tokenizer, question: str, answers: list[str], add_eos: bool = True,
              fmt: PromptFormat = DEFAULT_FORMAT) -> tuple[list[int], list[tuple[list[int], list[int]]]]:
    """``(prompt_ids, [(prefix_ids, answer_ids), ...])`` for one question and several candidate answers (true,
    paraphrased, perturbed), tokenized exactly as the training data is (palu_ds.data.prompt.encode_pair, format
    ``fmt``): generation starts from ``prompt_ids``; each answer is scored after its ``prefix_ids`` (the same ids,
    unless the tokenizer merges across the prompt/answer boundary). Each answer ends with EOS when ``add_eos``
    (TOFU scores the EOS too)."""
    pairs = [encode_pair(tokenizer, question, a, fmt, add_eos) for a in answers]
    return encode_question(tokenizer, question, fmt), [(prefix, ids) for prefix, ids, _ in pairs]
