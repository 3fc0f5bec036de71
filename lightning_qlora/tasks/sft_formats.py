"""The record formats of supervised fine-tuning, recognised from their keys, checked, and tokenized.

* ``messages``: ``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}, ...]}``,
  multi-turn; rendered by the tokenizer's chat template, with the loss on the assistant turns only;
* ``prompt_completion``: ``{"prompt": "...", "completion": "..."}``, loss on the completion;
* ``alpaca``: ``{"instruction", "input" (optional), "output"}``, loss on the output;
* ``text``: ``{"text": "..."}``, plain text (continued pre-training; TRL's language-modeling records), loss
  on every token.

Users' column names map onto these with ``columns`` (``{"messages": "conversations", "role": "from",
"content": "value"}`` reads ShareGPT files) and role names with ``roles`` (``{"human": "user", "gpt":
"assistant"}``). A record that cannot be used (unknown role, empty conversation, content that is not a
string, no assistant turn) is a `DataError` naming its file and line or row.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .data_files import DataError, _json_type
from .record_files import SourcedRecord

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
FORMATS = ("messages", "prompt_completion", "alpaca", "text")
ROLES = ("system", "user", "assistant", "tool")
FIELDS: dict[str, tuple[str, ...]] = {
    "messages": ("messages", "role", "content"),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "input", "output"),
    "text": ("text",),
}
"""The names ``columns`` may map, per format."""
NEEDS: dict[str, str] = {
    "messages": "messages (a list of turns with role and content)",
    "prompt_completion": "prompt and completion",
    "alpaca": "instruction and output (input optional)",
    "text": "text (a string)",
}


def check_format_settings(fmt: str | None, columns: Mapping[str, str] | None) -> None:
    """``format`` is one of :data:`FORMATS` (or None: recognised); ``columns`` only maps known names."""
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"data.format={fmt!r} is not a format; choose one of {list(FORMATS)} or null")
    known = {name for names in FIELDS.values() for name in names}
    for key, value in (columns or {}).items():
        if key not in known:
            raise ValueError(f"data.columns has {key!r}, which names no field; mappable: {sorted(known)}")
        if not isinstance(value, str) or not value:
            raise ValueError(f"data.columns.{key} must be a column name, got {value!r}")


def detect_format(record: SourcedRecord, columns: Mapping[str, str]) -> str:
    """The format the first record's keys show (after the ``columns`` mapping)."""
    keys = set(record.record)
    name = {k: columns.get(k, k) for names in FIELDS.values() for k in names}
    if name["messages"] in keys:
        return "messages"
    if name["prompt"] in keys and name["completion"] in keys:
        return "prompt_completion"
    if name["instruction"] in keys or name["output"] in keys:
        return "alpaca"
    if name["text"] in keys:
        return "text"
    raise DataError(
        f"{record.where}: cannot tell the data format from the keys {sorted(keys)}; expected 'messages' "
        "(conversations), 'prompt' and 'completion', 'instruction' and 'output' (alpaca), or 'text'. Name "
        "the format with data.format= and your column names with data.columns={messages: <your column>, ...}"
    )


def _string(value: Any, what: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field {what!r} is {_json_type(value)} ({value!r:.40}), expected a string")
    return value


def _field(record: Mapping[str, Any], name: str, column: str, where: str, fmt: str) -> Any:
    if column not in record:
        mapped = f" (data.columns maps {name!r} to {column!r})" if column != name else ""
        raise DataError(
            f"{where}: missing field {column!r}{mapped}; {fmt} records need {NEEDS[fmt]}; "
            f"found {', '.join(map(repr, record)) or 'no fields'}"
        )
    return record[column]


def normalize_record(
    sourced: SourcedRecord, fmt: str, columns: Mapping[str, str], roles: Mapping[str, str]
) -> dict[str, Any]:
    """The record in the canonical form of ``fmt``, or a `DataError` naming where and what is wrong."""
    record, where = sourced.record, sourced.where
    col = {k: columns.get(k, k) for k in FIELDS[fmt]}
    if fmt == "messages":
        turns = _field(record, "messages", col["messages"], where, fmt)
        if not isinstance(turns, list):
            raise DataError(f"{where}: {col['messages']!r} is {_json_type(turns)}, expected a list of turns")
        if not turns:
            raise DataError(f"{where}: empty conversation ({col['messages']!r} has no turns)")
        messages = []
        for i, turn in enumerate(turns):
            at = f"{where}: turn {i}"
            if not isinstance(turn, Mapping):
                raise DataError(f"{at} is {_json_type(turn)}, expected an object with role and content")
            role = _string(_field(turn, "role", col["role"], at, fmt), col["role"], at)
            role = roles.get(role, role)
            if role not in ROLES:
                raise DataError(
                    f"{at}: unknown role {role!r}; allowed: {', '.join(ROLES)} (map other names with "
                    "data.roles={human: user, gpt: assistant})"
                )
            content = _string(_field(turn, "content", col["content"], at, fmt), col["content"], at)
            messages.append({"role": role, "content": content})
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(
                f"{where}: no assistant turn, so nothing to learn (roles: {[m['role'] for m in messages]})"
            )
        return {"messages": messages}
    if fmt == "text":
        text = _string(_field(record, "text", col["text"], where, fmt), col["text"], where)
        if not text.strip():
            raise DataError(f"{where}: empty {col['text']!r}, so nothing to learn")
        return {"text": text}
    if fmt == "prompt_completion":
        prompt = _string(_field(record, "prompt", col["prompt"], where, fmt), col["prompt"], where)
        completion = _string(
            _field(record, "completion", col["completion"], where, fmt), col["completion"], where
        )
        return {"prompt": prompt, "completion": completion}
    instruction = _string(
        _field(record, "instruction", col["instruction"], where, fmt), col["instruction"], where
    )
    output = _string(_field(record, "output", col["output"], where, fmt), col["output"], where)
    extra = record.get(col["input"])
    if extra is not None:
        extra = _string(extra, col["input"], where)
    return {"instruction": instruction, "input": extra, "output": output}


def _tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], prompt: bool) -> str:
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt))


def encode_messages(
    messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, where: str = ""
) -> dict[str, list[int]]:
    """Token ids of the whole conversation, with labels on the assistant turns only.

    The chat template renders the conversation; each assistant turn's text is the part between the
    rendering of the turns before it (with the generation prompt) and the rendering up to and including
    it, so the labels cover the answer and the template's end-of-turn tokens. The pieces are tokenized
    one after the other, so a label boundary never falls inside a token.
    """
    full = _render(tokenizer, messages, prompt=False)
    cuts: list[tuple[int, int]] = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:k], prompt=True)) if k else 0
        end_text = _render(tokenizer, messages[: k + 1], prompt=False)
        if not full.startswith(end_text) or start > len(end_text):
            raise DataError(
                f"{where}: the chat template does not render this conversation turn by turn (a later turn "
                "changes the text of an earlier one), so the assistant turns cannot be located"
            )
        cuts.append((start, len(end_text)))
    ids: list[int] = []
    labels: list[int] = []
    position = 0
    for start, end in cuts:
        before = _tokens(tokenizer, full[position:start])
        answer = _tokens(tokenizer, full[start:end])
        ids += before + answer
        labels += [IGNORE_INDEX] * len(before) + answer
        position = end
    rest = _tokens(tokenizer, full[position:])
    return {"input_ids": ids + rest, "labels": labels + [IGNORE_INDEX] * len(rest)}
