"""Tokenizer side: prompts to token ids (with or without the chat template), stop ids, streamed text."""

from __future__ import annotations

from pathlib import Path

from partinfer.common.errors import PartinferError


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise PartinferError(f"could not load a tokenizer from {model_dir} ({type(e).__name__}: {first_line})") from e


def require_utf8(text: str, what: str) -> str:
    """Text that came from bytes we could not decode (argv and stdin keep them as lone surrogates) is
    reported, not guessed at: a one-line error naming `what` and the first bad position."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PartinferError(f"{what} is not valid UTF-8 text (at character {e.start}); type or save it as UTF-8") from None
    return text


def encode_prompt(tokenizer, text: str, chat_template: bool = True, history: list[dict] | None = None) -> list[int]:
    """Token ids for one user prompt; with the chat template the assistant turn is opened."""
    if not text.strip():
        raise PartinferError("empty prompt; pass some text with --prompt")
    require_utf8(text, "the prompt")
    if chat_template and tokenizer.chat_template:
        return encode_messages(tokenizer, list(history or []) + [{"role": "user", "content": text}])
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def encode_messages(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation in the model's chat template, with the assistant's turn opened."""
    for message in messages:
        require_utf8(message["content"], f"a {message['role']} message")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def stop_token_ids(tokenizer, model_dir: Path | None = None) -> set[int]:
    """EOS ids from the tokenizer and generation_config.json (chat models often end with <|im_end|>)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for token in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None:
            ids.add(tid)
    if model_dir is not None:
        try:
            from transformers import GenerationConfig

            eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
            ids.update([eos] if isinstance(eos, int) else (eos or []))
        except OSError:
            pass
    return ids


class TextStream:
    """Turns a growing list of token ids into printable text deltas (handles multi-token characters)."""

    def __init__(self, tokenizer, skip_ids: set[int] = frozenset()):
        self.tokenizer = tokenizer
        self.skip_ids = set(skip_ids)
        self.ids: list[int] = []
        self.printed = ""

    def push(self, token_id: int) -> str:
        if token_id in self.skip_ids:
            return ""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # incomplete UTF-8 sequence: wait for the next token
            return ""
        delta, self.printed = text[len(self.printed) :], text
        return delta
