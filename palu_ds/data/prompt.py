"""Prompt formatting: the tokenizer's chat template when it has one, else a plain template; BOS exactly once."""

from __future__ import annotations

PLAIN_TEMPLATE = "Question: {question}\nAnswer:"


def format_prompt(tokenizer, question: str) -> str:
    """The prompt text for ``question`` (without BOS; :func:`encode_prompt` adds it exactly once)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
    return PLAIN_TEMPLATE.format(question=question)


def prompt_format_id(tokenizer) -> str:
    """A string that identifies the prompt format (part of the reference cache key)."""
    return "chat:" + tokenizer.chat_template if getattr(tokenizer, "chat_template", None) else "plain:" + PLAIN_TEMPLATE


def with_bos(tokenizer, ids: list[int]) -> list[int]:
    """``ids`` starting with exactly one BOS when the tokenizer has a BOS token (a chat template that already wrote it
    keeps just that one; a doubled one is collapsed); unchanged when it has none (e.g. Qwen). The one BOS policy of
    training (QA prompts, text chunks) and evaluation (QA prompts, MUSE raw-text prompts)."""
    ids = list(ids)
    bos = tokenizer.bos_token_id
    if bos is None:
        return ids
    while len(ids) > 1 and ids[0] == bos and ids[1] == bos:
        ids.pop(0)
    return ids if ids and ids[0] == bos else [bos] + ids


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of any prompt text with BOS exactly once (:func:`with_bos`) and no EOS."""
    return with_bos(tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompt(tokenizer, question: str) -> list[int]:
    """Token ids of the prompt for ``question`` with BOS exactly once."""
    return encode_text(tokenizer, format_prompt(tokenizer, question))


def answer_ids(tokenizer, answer: str, add_eos: bool = True) -> list[int]:
    """Token ids of the answer as it follows the prompt (``" " + answer``), then EOS (any tokenizer)."""
    ids = list(tokenizer(" " + answer, add_special_tokens=False)["input_ids"])
    return ids + [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else ids


def encode_answer(tokenizer, answer: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``" " + answer`` followed by EOS, and each token's character offsets into ``answer``.

    The leading space separates the answer from the prompt; offsets are shifted back so they index ``answer``.
    EOS gets the empty offset ``(len(answer), len(answer))``.
    """
    enc = tokenizer(" " + answer, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [(max(0, a - 1), max(0, b - 1)) for a, b in enc["offset_mapping"]]
    ids = list(enc["input_ids"])
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; set one (e.g. tokenizer.eos_token = '</s>')")
    ids.append(tokenizer.eos_token_id)
    offsets.append((len(answer), len(answer)))
    return ids, offsets
