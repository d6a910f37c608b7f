"""Chat templates without torch or transformers: the Jinja template that `xlora-export` carries beside the graph
(`OUT.chat_template.jinja`, from the checkpoint's tokenizer config) rendered the way transformers'
`apply_chat_template` renders it (a sandboxed environment, `trim_blocks` and `lstrip_blocks`, `raise_exception`,
`strftime_now`, a `tojson` that keeps non-ASCII text, the tokenizer's special tokens as variables).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .errors import XLoraError, brief

if TYPE_CHECKING:
    from .session import XLoraSession

__all__ = ["ChatTemplate", "check_messages"]


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """OpenAI chat messages as the template reads them: each a {role, content} object whose content is a string
    or a list of text parts (joined).

    Raises:
        XLoraError: not a non-empty list of such objects.
    """
    if not isinstance(messages, list) or not messages:
        raise XLoraError(f"messages={brief(messages)}: expected a non-empty list of {{role, content}} objects")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise XLoraError(f"messages[{i}]={brief(message)}: expected a {{role, content}} object")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise XLoraError(f"messages[{i}].role={brief(role)}: expected a string such as \"user\"")
        if isinstance(content, list):
            texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
                raise XLoraError(f"messages[{i}].content: expected a string or a list of {{type: \"text\", text}} "
                                 f"parts")
            content = "".join(texts)
        elif content is None and role == "assistant":
            content = ""
        elif not isinstance(content, str):
            raise XLoraError(f"messages[{i}].content={brief(content)}: expected a string")
        out.append(dict(message, content=content))
    return out


class ChatTemplate:
    """A compiled chat template and the special tokens it may use.

    Args:
        source: the Jinja template text.
        special_tokens: variables such as bos_token, eos_token (their strings).
        path: where the template came from, for messages.
    Raises:
        XLoraError: the template does not compile.
    """

    def __init__(self, source: str, special_tokens: dict[str, str], path: str) -> None:
        try:
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise XLoraError(f"{path}: rendering a chat template needs jinja2: pip install \"./runtime[chat]\" "
                             f"(or jinja2)") from None

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
                   sort_keys: bool = False) -> str:
            return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        def strftime_now(format: str) -> str:  # noqa: A002 - the name templates call it with
            return datetime.now().strftime(format)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
        self._errors = (jinja2.exceptions.TemplateError,)
        self.path = path
        self.special_tokens = dict(special_tokens)
        try:
            self.template = env.from_string(source)
        except jinja2.exceptions.TemplateError as e:
            raise XLoraError(f"{path}: not a valid Jinja chat template ({e})") from None

    @classmethod
    def of_session(cls, session: XLoraSession) -> ChatTemplate | None:
        """The export's chat template (None when it has none), with the tokenizer's bos and eos tokens."""
        path = session.info.chat_template_path
        if path is None:
            return None
        with open(path, encoding="utf-8") as f:
            source = f.read()
        tokens = {}
        tokenizer = session.tokenizer
        ids = {"bos_token": session.info.bos_token_id,
               "eos_token": (session.info.eos_token_ids or [None])[0]}
        for name, token_id in ids.items():
            token = tokenizer.id_to_token(token_id) if tokenizer is not None and token_id is not None else None
            if token is not None:
                tokens[name] = token
        return cls(source, tokens, path)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text of a conversation (messages checked by `check_messages`).

        Raises:
            XLoraError: the template refused the conversation (its `raise_exception`, or an error while rendering).
        """
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        **self.special_tokens)
        except self._errors as e:
            raise XLoraError(f"chat template: {e}") from None
