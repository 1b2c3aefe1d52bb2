"""OpenAI Chat Completions <-> Anthropic Messages translation, kept pure (no I/O, no aiohttp).

The gateway speaks OpenAI to its clients whatever the upstream is, so every Anthropic call runs
through here twice (request out, response or stream back). Keeping it free of I/O makes it cheap
to test exhaustively and lets the provider client stay a thin transport. It runs on the request
path, so it works on plain dicts, builds only the structures it must hand on, and passes large
client-owned values (JSON schemas, base64 payloads) by reference instead of copying them.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, Final, NamedTuple, cast

import msgspec

from edgeroute.errors import EdgerouteError
from edgeroute.providers.base import MAX_USAGE_TOKENS

__all__ = [
    "MalformedUpstream",
    "MessagesStreamTranslator",
    "StreamUsage",
    "TranslationError",
    "UpstreamStreamError",
    "anthropic_error_to_openai",
    "chat_request_to_messages",
    "messages_response_to_chat",
]


class TranslationError(EdgerouteError, ValueError):
    """The OpenAI request cannot be expressed for Anthropic.

    Raised before any upstream call so the client gets a 400 naming the field to fix (`param`,
    in OpenAI's own `messages[2].content` style) instead of an opaque upstream rejection.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def to_openai(self) -> dict[str, Any]:
        """The error body a 400 should carry, so callers need not know OpenAI's error shape."""
        return {
            "error": {
                "message": self.message,
                "type": "invalid_request_error",
                "param": self.param,
                "code": None,
            }
        }


class UpstreamStreamError(EdgerouteError):
    """Anthropic sent an `error` event mid-stream (after the HTTP 200 was already received).

    It is an exception rather than a chunk because the router must see it: a stream that dies
    with `overloaded_error` is a failed attempt for the breaker, not a normal end of output.
    `error_type` is Anthropic's (e.g. `overloaded_error`) so the caller can classify it.
    """

    def __init__(self, message: str, error_type: str = "api_error") -> None:
        super().__init__(message)
        self.message = message
        self.error_type = error_type


class MalformedUpstream(EdgerouteError, ValueError):
    """Anthropic's answer (a message or a stream event) is not shaped as the API says.

    The request side trusts the client only as far as `TranslationError` allows; the response
    side trusts the upstream no further: a wrong type anywhere is this error, never a stray
    TypeError, so the adapter can count it as the provider's failure and fail over.
    """


def _expect_dict(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MalformedUpstream(f"{what} is {type(value).__name__}, not an object")
    return value


def _optional_str(value: Any, what: str) -> str:
    """Strings the API may leave out (null counts as absent, as the lenient reads did)."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise MalformedUpstream(f"{what} is {type(value).__name__}, not a string")
    return value


def _count(usage: dict[str, Any], key: str) -> int:
    value = usage.get(key)
    if value is None:
        return 0
    if type(value) is not int or not 0 <= value <= MAX_USAGE_TOKENS:
        raise MalformedUpstream(
            f"usage.{key} is not a token count (0..{MAX_USAGE_TOKENS}): {value!r:.40}"
        )
    return value


class StreamUsage(NamedTuple):
    """Token counts of a finished stream; a tuple so `prompt, completion = t.usage` works too."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


# Anthropic stop_reason -> OpenAI finish_reason. `pause_turn` only happens with server-side tools
# and means "the turn ended early"; `stop` is the closest thing an OpenAI client understands.
_FINISH_REASONS: Final[dict[str, str]] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
    "pause_turn": "stop",
}

# Anthropic error type -> (OpenAI error type, OpenAI error code). The codes are the ones OpenAI
# clients and frameworks actually branch on (e.g. retry on rate_limit_exceeded).
_ERROR_TYPES: Final[dict[str, tuple[str, str | None]]] = {
    "invalid_request_error": ("invalid_request_error", None),
    "authentication_error": ("authentication_error", "invalid_api_key"),
    "permission_error": ("permission_error", None),
    "not_found_error": ("not_found_error", None),
    "request_too_large": ("invalid_request_error", "request_too_large"),
    "rate_limit_error": ("rate_limit_error", "rate_limit_exceeded"),
    "billing_error": ("insufficient_quota", "insufficient_quota"),
    "api_error": ("server_error", None),
    "overloaded_error": ("server_error", "overloaded"),
    "timeout_error": ("server_error", "timeout"),
}

# Anthropic reports an over-long prompt as a plain invalid_request_error; OpenAI has a dedicated
# code that LangChain & co. use to trigger history trimming, so we recover it from the message.
CONTEXT_LENGTH_MARKERS: Final = ("prompt is too long", "exceed context limit")
# How Anthropic words a refusal by its content filter (a 400 invalid_request_error too).
CONTENT_FILTER_MARKERS: Final = ("blocked by content filtering policy",)

# Anthropic only accepts tool ids matching this; ids minted by other providers (e.g.
# "functions.get_weather:0") show up when a conversation fails over, so they are rewritten.
_TOOL_ID_OK: Final = re.compile(r"[A-Za-z0-9_-]+").fullmatch
_TOOL_ID_BAD: Final = re.compile(r"[^A-Za-z0-9_-]")

_json_decode: Final = msgspec.json.decode
_json_encode: Final = msgspec.json.encode


# --------------------------------------------------------------------------------------------
# Request: OpenAI chat.completions -> Anthropic messages
# --------------------------------------------------------------------------------------------


def chat_request_to_messages(
    body: dict[str, Any], *, model: str, default_max_tokens: int = 4096
) -> dict[str, Any]:
    """Build the Anthropic request for an OpenAI chat request.

    `model` is the upstream deployment name chosen by the router (the client's `model` is a
    route name). `default_max_tokens` exists because Anthropic requires `max_tokens` while
    OpenAI does not. Fields that only tune or annotate OpenAI (penalties, seed, logit_bias,
    store, service_tier, metadata, prediction, stream_options, reasoning_effort, ...) are
    dropped; fields whose loss would silently change what the client gets back raise
    `TranslationError` instead.
    """
    _reject_unrepresentable(body)

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise TranslationError("'messages' must be a non-empty array", "messages")

    system_parts: list[str] = []
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise TranslationError(f"messages[{i}] must be an object", f"messages[{i}]")
        role = msg.get("role")
        if role == "user":
            _append_turn(out, "user", _user_content(msg.get("content"), i))
        elif role == "assistant":
            assistant = _assistant_content(msg, i)
            if assistant is not None:
                _append_turn(out, "assistant", assistant)
        elif role == "tool":
            _append_tool_result(out, _tool_result(msg, i))
        elif role == "system" or role == "developer":
            text = _text_only(msg.get("content"), f"messages[{i}].content")
            if text:
                system_parts.append(text)
        elif role is None:
            raise TranslationError(f"messages[{i}] has no 'role'", f"messages[{i}].role")
        elif role == "function":
            raise TranslationError(
                "the legacy 'function' role is not supported; use 'tool' messages",
                f"messages[{i}].role",
            )
        else:
            raise TranslationError(f"unknown role {role!r}", f"messages[{i}].role")
    if not out:
        raise TranslationError(
            "at least one user or assistant message is required besides system messages",
            "messages",
        )

    req: dict[str, Any] = {"model": model, "max_tokens": _max_tokens(body, default_max_tokens)}
    if system_parts:
        req["system"] = system_parts[0] if len(system_parts) == 1 else "\n\n".join(system_parts)
    req["messages"] = out

    temperature = body.get("temperature")
    if temperature is not None:
        if not _is_number(temperature) or not 0 <= temperature <= 1:
            # OpenAI allows up to 2; Anthropic rejects anything above 1. Failing here names the
            # field; clamping would silently change sampling.
            raise TranslationError(
                "temperature must be a number between 0 and 1 for this model", "temperature"
            )
        req["temperature"] = temperature
    top_p = body.get("top_p")
    if top_p is not None:
        if not _is_number(top_p):
            raise TranslationError("top_p must be a number", "top_p")
        req["top_p"] = top_p
    top_k = body.get("top_k")  # not OpenAI, but vLLM-style clients send it and Anthropic has it
    if top_k is not None:
        if type(top_k) is not int:
            raise TranslationError("top_k must be an integer", "top_k")
        req["top_k"] = top_k

    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            req["stop_sequences"] = [stop]
        elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
            if stop:
                req["stop_sequences"] = stop
        else:
            raise TranslationError("stop must be a string or an array of strings", "stop")

    if body.get("stream") is True:
        req["stream"] = True

    user = body.get("user")
    if isinstance(user, str) and user:
        req["metadata"] = {"user_id": user}

    tools = body.get("tools")
    if tools:
        req["tools"] = _tools(tools)
    tool_choice = _tool_choice(body.get("tool_choice"), has_tools=bool(tools))
    if body.get("parallel_tool_calls") is False and tools:
        if tool_choice is None:
            tool_choice = {"type": "auto"}
        if tool_choice["type"] != "none":
            tool_choice["disable_parallel_tool_use"] = True
    if tool_choice is not None:
        req["tool_choice"] = tool_choice
    return req


def _reject_unrepresentable(body: dict[str, Any]) -> None:
    """Fail on fields whose silent loss would hand the client something it did not ask for."""
    n = body.get("n")
    if n is not None and n != 1:
        raise TranslationError("n > 1 is not supported by this model", "n")
    if body.get("logprobs"):
        raise TranslationError("logprobs are not supported by this model", "logprobs")
    if body.get("top_logprobs"):
        raise TranslationError("top_logprobs are not supported by this model", "top_logprobs")
    response_format = body.get("response_format")
    if response_format is not None and (
        not isinstance(response_format, dict) or response_format.get("type") != "text"
    ):
        raise TranslationError(
            "response_format other than 'text' is not supported by this model",
            "response_format.type",
        )
    modalities = body.get("modalities")
    if isinstance(modalities, list) and "audio" in modalities:
        raise TranslationError("audio output is not supported by this model", "modalities")
    if body.get("functions") is not None:
        raise TranslationError(
            "the legacy 'functions' parameter is not supported; use 'tools'", "functions"
        )
    if body.get("function_call") is not None:
        raise TranslationError(
            "the legacy 'function_call' parameter is not supported; use 'tool_choice'",
            "function_call",
        )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _max_tokens(body: dict[str, Any], default: int) -> int:
    # max_completion_tokens is the newer name and wins when a client sends both.
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is not None:
            if type(value) is not int or value < 1:
                raise TranslationError(f"{key} must be a positive integer", key)
            return value
    return default


def _append_turn(out: list[dict[str, Any]], role: str, content: str | list[dict[str, Any]]) -> None:
    """Append a turn, folding it into the previous one when the role repeats.

    Anthropic rejects two consecutive turns of the same role, which OpenAI allows (and which
    tool results, all mapped to `user`, produce routinely).
    """
    if out and out[-1]["role"] == role:
        prev = out[-1]
        blocks = _as_blocks(prev)
        if isinstance(content, str):
            if content:
                blocks.append({"type": "text", "text": content})
        else:
            blocks.extend(content)
    else:
        out.append({"role": role, "content": content})


def _append_tool_result(out: list[dict[str, Any]], block: dict[str, Any]) -> None:
    """Put a tool result into the current user turn, ahead of any non-result block.

    Anthropic requires tool_result blocks to lead the user turn that answers the tool calls.
    """
    if out and out[-1]["role"] == "user":
        blocks = _as_blocks(out[-1])
        pos, end = 0, len(blocks)
        while pos < end and blocks[pos].get("type") == "tool_result":
            pos += 1
        if pos == end:
            blocks.append(block)  # the usual case: results follow results
        else:
            blocks.insert(pos, block)
    else:
        out.append({"role": "user", "content": [block]})


def _as_blocks(message: dict[str, Any]) -> list[dict[str, Any]]:
    """Return the turn's content as a mutable block list (string content is kept until needed)."""
    content = message["content"]
    if isinstance(content, str):
        blocks: list[dict[str, Any]] = [{"type": "text", "text": content}] if content else []
        message["content"] = blocks
        return blocks
    return cast("list[dict[str, Any]]", content)


def _text_only(content: Any, param: str) -> str:
    """Flatten system/developer content: Anthropic's top-level `system` is plain text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for k, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise TranslationError(
                    "system messages may only contain text parts", f"{param}[{k}]"
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise TranslationError("text part without a string 'text'", f"{param}[{k}].text")
            texts.append(text)
        return "\n".join(texts)
    if content is None:
        return ""
    raise TranslationError("content must be a string or an array of parts", param)


def _user_content(content: Any, i: int) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content  # the common case: no block list at all
    if isinstance(content, list):
        return _parts_to_blocks(content, f"messages[{i}].content")
    raise TranslationError(
        "user content must be a string or an array of parts", f"messages[{i}].content"
    )


def _parts_to_blocks(parts: list[Any], param: str) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    for k, part in enumerate(parts):
        if not isinstance(part, dict):
            raise TranslationError("content parts must be objects", f"{param}[{k}]")
        ptype = part.get("type")
        if ptype == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise TranslationError("text part without a string 'text'", f"{param}[{k}].text")
            if text:  # Anthropic rejects empty text blocks; OpenAI tolerates them
                blocks.append({"type": "text", "text": text})
        elif ptype == "image_url":
            blocks.append(_image_block(part.get("image_url"), f"{param}[{k}].image_url"))
        elif ptype == "file":
            blocks.append(_file_block(part.get("file"), f"{param}[{k}].file"))
        elif ptype == "input_audio":
            raise TranslationError("audio input is not supported by this model", f"{param}[{k}]")
        else:
            raise TranslationError(f"unsupported content part type {ptype!r}", f"{param}[{k}].type")
    return blocks


def _image_block(image_url: Any, param: str) -> dict[str, Any]:
    # Some clients send the URL string directly instead of {"url": ...}.
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str) or not url:
        raise TranslationError("image_url.url must be a non-empty string", f"{param}.url")
    if url.startswith("data:"):
        media_type, data = _split_data_url(url, f"{param}.url")
        return {
            "type": "image",
            "source": {"type": "base64", "media_type": media_type, "data": data},
        }
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise TranslationError("image_url.url must be an http(s) or base64 data: URL", f"{param}.url")


def _file_block(file: Any, param: str) -> dict[str, Any]:
    """Inline PDFs become Anthropic document blocks; OpenAI file ids cannot be resolved here."""
    if not isinstance(file, dict):
        raise TranslationError("file part must carry a 'file' object", param)
    file_data = file.get("file_data")
    if not isinstance(file_data, str):
        raise TranslationError(
            "only inline file_data is supported (file_id refers to OpenAI storage)",
            f"{param}.file_data",
        )
    if not file_data.startswith("data:"):
        raise TranslationError("file_data must be a base64 data: URL", f"{param}.file_data")
    media_type, data = _split_data_url(file_data, f"{param}.file_data")
    if media_type != "application/pdf":
        raise TranslationError("only PDF files are supported", f"{param}.file_data")
    return {
        "type": "document",
        "source": {"type": "base64", "media_type": media_type, "data": data},
    }


def _split_data_url(url: str, param: str) -> tuple[str, str]:
    comma = url.find(",")
    header = url[5:comma] if comma > 0 else ""
    if not header.endswith(";base64"):
        raise TranslationError("data: URLs must be base64-encoded", param)
    media_type = header[:-7]
    if not media_type:
        raise TranslationError("data: URL without a media type", param)
    return media_type, url[comma + 1 :]


def _assistant_content(msg: dict[str, Any], i: int) -> str | list[dict[str, Any]] | None:
    """Assistant turn content, or None when the message carries nothing Anthropic accepts."""
    content = msg.get("content")
    tool_calls = msg.get("tool_calls")
    if msg.get("function_call") is not None:
        raise TranslationError(
            "legacy assistant 'function_call' is not supported; use 'tool_calls'",
            f"messages[{i}].function_call",
        )
    if isinstance(content, str):
        if not tool_calls:
            return content or None
        blocks: list[dict[str, Any]] = [{"type": "text", "text": content}] if content else []
    elif isinstance(content, list):
        blocks = []
        for k, part in enumerate(content):
            if not isinstance(part, dict):
                raise TranslationError(
                    "content parts must be objects", f"messages[{i}].content[{k}]"
                )
            ptype = part.get("type")
            text = part.get("text") if ptype == "text" else part.get("refusal")
            if ptype not in ("text", "refusal") or not isinstance(text, str):
                raise TranslationError(
                    "assistant content parts must be text or refusal",
                    f"messages[{i}].content[{k}]",
                )
            if text:
                blocks.append({"type": "text", "text": text})
    elif content is None:
        blocks = []
    else:
        raise TranslationError(
            "assistant content must be a string, an array of parts or null",
            f"messages[{i}].content",
        )

    if tool_calls:
        if not isinstance(tool_calls, list):
            raise TranslationError("tool_calls must be an array", f"messages[{i}].tool_calls")
        for j, call in enumerate(tool_calls):
            blocks.append(_tool_use_block(call, f"messages[{i}].tool_calls[{j}]"))
    return blocks or None


def _tool_use_block(call: Any, param: str) -> dict[str, Any]:
    if not isinstance(call, dict):
        raise TranslationError("tool call must be an object", param)
    call_id = call.get("id")
    if not isinstance(call_id, str) or not call_id:
        raise TranslationError("tool call without an id", f"{param}.id")
    fn = call.get("function")
    if call.get("type", "function") != "function" or not isinstance(fn, dict):
        raise TranslationError("only function tool calls are supported", f"{param}.type")
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise TranslationError("tool call without a function name", f"{param}.function.name")
    arguments = fn.get("arguments")
    if arguments is None or arguments == "":
        tool_input: Any = {}
    elif isinstance(arguments, str):
        try:
            tool_input = _json_decode(arguments)
        except msgspec.DecodeError:
            raise TranslationError(
                "tool call arguments are not valid JSON", f"{param}.function.arguments"
            ) from None
    else:
        raise TranslationError(
            "tool call arguments must be a JSON string", f"{param}.function.arguments"
        )
    if not isinstance(tool_input, dict):
        raise TranslationError(
            "tool call arguments must encode a JSON object", f"{param}.function.arguments"
        )
    return {"type": "tool_use", "id": _tool_id(call_id), "name": name, "input": tool_input}


def _tool_result(msg: dict[str, Any], i: int) -> dict[str, Any]:
    call_id = msg.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id:
        raise TranslationError("tool message without tool_call_id", f"messages[{i}].tool_call_id")
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": _tool_id(call_id)}
    content = msg.get("content")
    if isinstance(content, str):
        block["content"] = content
    elif isinstance(content, list):
        block["content"] = _parts_to_blocks(content, f"messages[{i}].content")
    elif content is not None:
        raise TranslationError(
            "tool content must be a string or an array of parts", f"messages[{i}].content"
        )
    return block


def _tool_id(call_id: str) -> str:
    # Deterministic, so a tool_use and its tool_result still pair up after rewriting.
    return call_id if _TOOL_ID_OK(call_id) else _TOOL_ID_BAD.sub("_", call_id)


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise TranslationError("tools must be an array", "tools")
    out: list[dict[str, Any]] = []
    for k, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise TranslationError("only function tools are supported", f"tools[{k}].type")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise TranslationError("function tool without 'function'", f"tools[{k}].function")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise TranslationError("function tool without a name", f"tools[{k}].function.name")
        schema = fn.get("parameters")
        if schema is None:
            schema = {"type": "object", "properties": {}}
        elif not isinstance(schema, dict):
            raise TranslationError(
                "function parameters must be a JSON schema object",
                f"tools[{k}].function.parameters",
            )
        elif "type" not in schema:
            # OpenAI accepts a bare {} for "no arguments"; Anthropic insists on type: object.
            schema = {"type": "object", **schema}
        entry: dict[str, Any] = {"name": name}
        description = fn.get("description")
        if isinstance(description, str) and description:
            entry["description"] = description
        entry["input_schema"] = schema  # by reference: schemas can be large
        out.append(entry)
    return out


def _tool_choice(choice: Any, *, has_tools: bool) -> dict[str, Any] | None:
    if choice is None:
        return None
    if choice == "auto" or choice == "none":
        # Without tools both mean "just answer", which is what Anthropic does anyway.
        return {"type": choice} if has_tools else None
    if choice == "required":
        mapped: dict[str, Any] = {"type": "any"}
    elif isinstance(choice, dict) and choice.get("type") == "function":
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not name:
            raise TranslationError("tool_choice names no function", "tool_choice.function.name")
        mapped = {"type": "tool", "name": name}
    else:
        raise TranslationError(
            "tool_choice must be 'auto', 'none', 'required' or a function", "tool_choice"
        )
    if not has_tools:
        raise TranslationError("tool_choice requires tools", "tool_choice")
    return mapped


# --------------------------------------------------------------------------------------------
# Response: Anthropic message -> OpenAI chat.completion
# --------------------------------------------------------------------------------------------


def messages_response_to_chat(
    resp: dict[str, Any], *, model: str, request_id: str | None = None
) -> dict[str, Any]:
    """Build the OpenAI `chat.completion` for an Anthropic message.

    `model` is what the client should see (its route name or the deployment, the caller
    decides); `request_id` lets the gateway use its own id so logs and responses agree.
    Thinking and server-tool blocks have no OpenAI counterpart and are left out.
    """
    resp = _expect_dict(resp, "the message")
    texts: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    if resp.get("type") == "error":
        # Some proxies answer 200 with Anthropic's error body: still a failed attempt.
        raise MalformedUpstream("the message is an error object")
    content = resp.get("content")
    if not isinstance(content, list):
        raise MalformedUpstream("the message has no content array")
    for k, block in enumerate(content):
        block = _expect_dict(block, f"content[{k}]")
        btype = block.get("type")
        if btype == "text":
            texts.append(_optional_str(block.get("text"), f"content[{k}].text"))
        elif btype == "tool_use":
            tool_calls.append(
                {
                    "id": _optional_str(block.get("id"), f"content[{k}].id"),
                    "type": "function",
                    "function": {
                        "name": _optional_str(block.get("name"), f"content[{k}].name"),
                        "arguments": _json_encode(block.get("input") or {}).decode(),
                    },
                }
            )
    message_id = resp.get("id")
    message: dict[str, Any] = {
        "role": "assistant",
        # OpenAI sends null content for a pure tool-call turn, and "" for an empty answer.
        "content": "".join(texts) if texts else (None if tool_calls else ""),
        "refusal": None,
    }
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": request_id or (message_id if isinstance(message_id, str) else "") or _new_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": _finish_reason(resp.get("stop_reason")),
            }
        ],
        "usage": _usage(resp.get("usage")),
    }


def _finish_reason(stop_reason: Any) -> str:
    return _FINISH_REASONS.get(stop_reason, "stop") if isinstance(stop_reason, str) else "stop"


def _usage(usage: Any) -> dict[str, Any]:
    """OpenAI usage; cache reads and writes count as prompt tokens, as they do for OpenAI."""
    if usage is None:
        return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    usage = _expect_dict(usage, "usage")
    cache_read = _count(usage, "cache_read_input_tokens")
    prompt = (
        _count(usage, "input_tokens") + _count(usage, "cache_creation_input_tokens") + cache_read
    )
    completion = _count(usage, "output_tokens")
    out: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if "cache_read_input_tokens" in usage:
        out["prompt_tokens_details"] = {"cached_tokens": cache_read}
    return out


def _new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


# --------------------------------------------------------------------------------------------
# Streaming: Anthropic SSE events -> OpenAI chat.completion.chunk
# --------------------------------------------------------------------------------------------


class MessagesStreamTranslator:
    """Turns one Anthropic event stream into OpenAI chunks, one event at a time.

    Stateful because the two protocols index differently: Anthropic numbers content blocks
    (text and tool_use share one sequence) while OpenAI numbers tool calls only, and usage
    arrives split across `message_start` and `message_delta`. Unknown event and block types
    yield nothing, as Anthropic asks clients to tolerate new ones.
    """

    __slots__ = (
        "_cache_read",
        "_cache_seen",
        "_completion_tokens",
        "_created",
        "_finished",
        "_id",
        "_include_usage",
        "_model",
        "_prompt_tokens",
        "_tool_index",
        "finish_reason",
    )

    def __init__(self, *, model: str, include_usage: bool, request_id: str | None = None) -> None:
        self._model = model
        self._include_usage = include_usage
        self._id = request_id or ""
        self._created = int(time.time())
        self._tool_index: dict[int, int] = {}  # Anthropic block index -> OpenAI tool_call index
        self._prompt_tokens = 0
        self._completion_tokens = 0
        self._cache_read = 0
        self._cache_seen = False
        self._finished = False
        self.finish_reason: str | None = None

    @property
    def usage(self) -> StreamUsage:
        return StreamUsage(self._prompt_tokens, self._completion_tokens)

    def feed(self, event: str, data: dict[str, Any]) -> list[dict[str, Any]]:
        """Translate one event; `event` may be empty, then the payload's `type` decides.

        Raises MalformedUpstream when the event's payload is not shaped as documented.
        """
        data = _expect_dict(data, f"{event or 'stream'} event data")
        kind = event or data.get("type", "")
        # Ordered by frequency: deltas are nearly every event of a stream.
        if kind == "content_block_delta":
            return self._on_block_delta(data)
        if kind == "ping" or kind == "content_block_stop":
            return []
        if kind == "content_block_start":
            return self._on_block_start(data)
        if kind == "message_start":
            return self._on_message_start(data)
        if kind == "message_delta":
            return self._on_message_delta(data)
        if kind == "message_stop":
            return self._on_message_stop()
        if kind == "error":
            err = data.get("error")
            if isinstance(err, dict):
                raise UpstreamStreamError(
                    str(err.get("message") or "upstream stream error"),
                    str(err.get("type") or "api_error"),
                )
            raise UpstreamStreamError("upstream stream error")
        return []

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }
        if self._include_usage:
            chunk["usage"] = None  # OpenAI marks every non-final chunk so when usage is requested
        return chunk

    def _on_message_start(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        message = data.get("message")
        if isinstance(message, dict):
            if not self._id:
                self._id = _optional_str(message.get("id"), "message.id") or _new_id()
            self._take_usage(message.get("usage"))
        elif not self._id:
            self._id = _new_id()
        return [self._chunk({"role": "assistant", "content": ""})]

    def _on_block_start(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        block = data.get("content_block")
        if not isinstance(block, dict):
            return []
        btype = block.get("type")
        if btype == "tool_use":
            tool_index = len(self._tool_index)
            self._tool_index[_block_index(data, tool_index)] = tool_index
            call = {
                "index": tool_index,
                "id": _optional_str(block.get("id"), "content_block.id"),
                "type": "function",
                "function": {
                    "name": _optional_str(block.get("name"), "content_block.name"),
                    "arguments": "",
                },
            }
            return [self._chunk({"tool_calls": [call]})]
        if btype == "text":
            text = _optional_str(block.get("text"), "content_block.text")
            if text:
                return [self._chunk({"content": text})]
        return []

    def _on_block_delta(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        delta = data.get("delta")
        if not isinstance(delta, dict):
            return []
        dtype = delta.get("type")
        if dtype == "text_delta":
            text = _optional_str(delta.get("text"), "delta.text")
            return [self._chunk({"content": text})] if text else []
        if dtype == "input_json_delta":
            partial = _optional_str(delta.get("partial_json"), "delta.partial_json")
            tool_index = self._tool_index.get(_block_index(data, -1))
            # Deltas of blocks we did not announce (server tools) have no OpenAI tool call.
            if not partial or tool_index is None:
                return []
            return [
                self._chunk(
                    {"tool_calls": [{"index": tool_index, "function": {"arguments": partial}}]}
                )
            ]
        return []  # thinking, signature and citation deltas have no OpenAI counterpart

    def _on_message_delta(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        self._take_usage(data.get("usage"))
        delta = data.get("delta")
        stop_reason = delta.get("stop_reason") if isinstance(delta, dict) else None
        self.finish_reason = _finish_reason(stop_reason)
        self._finished = True
        return [self._chunk({}, self.finish_reason)]

    def _on_message_stop(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if not self._finished:
            # OpenAI clients wait for a finish_reason; never end a stream without one.
            self.finish_reason = "stop"
            self._finished = True
            out.append(self._chunk({}, "stop"))
        if self._include_usage:
            usage: dict[str, Any] = {
                "prompt_tokens": self._prompt_tokens,
                "completion_tokens": self._completion_tokens,
                "total_tokens": self._prompt_tokens + self._completion_tokens,
            }
            if self._cache_seen:
                usage["prompt_tokens_details"] = {"cached_tokens": self._cache_read}
            out.append(
                {
                    "id": self._id,
                    "object": "chat.completion.chunk",
                    "created": self._created,
                    "model": self._model,
                    "choices": [],
                    "usage": usage,
                }
            )
        return out

    def _take_usage(self, usage: Any) -> None:
        """Fold in a usage object; Anthropic's counts are cumulative, so later values replace."""
        if usage is None:
            return
        usage = _expect_dict(usage, "usage")
        if "output_tokens" in usage:
            self._completion_tokens = _count(usage, "output_tokens")
        if "input_tokens" in usage or "cache_read_input_tokens" in usage:
            cache_read = _count(usage, "cache_read_input_tokens")
            self._prompt_tokens = (
                _count(usage, "input_tokens")
                + _count(usage, "cache_creation_input_tokens")
                + cache_read
            )
            if "cache_read_input_tokens" in usage:
                self._cache_seen = True
                self._cache_read = cache_read


def _block_index(data: dict[str, Any], default: int) -> int:
    index = data.get("index", default)
    if type(index) is not int:
        raise MalformedUpstream(f"content block index is not an integer: {index!r:.40}")
    return index


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def anthropic_error_to_openai(status: int, body: dict[str, Any]) -> dict[str, Any]:
    """Re-shape an Anthropic error body so OpenAI clients can parse and branch on it.

    Tolerates bodies that are not Anthropic's (a proxy's HTML page decoded to {}), falling
    back on the HTTP status for the type. The status itself is left to the caller.
    """
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        upstream_type = err.get("type")
        message = err.get("message")
    else:
        upstream_type = None
        message = body.get("message") if isinstance(body, dict) else None
    if not isinstance(message, str) or not message:
        message = f"upstream returned HTTP {status}"

    mapped = _ERROR_TYPES.get(upstream_type) if isinstance(upstream_type, str) else None
    if mapped is not None:
        err_type, code = mapped
    elif status == 429:
        err_type, code = "rate_limit_error", "rate_limit_exceeded"
    elif status >= 500:
        err_type, code = "server_error", None
    else:
        err_type, code = "invalid_request_error", None
    if err_type == "invalid_request_error" and code is None:
        lowered = message.lower()
        if any(marker in lowered for marker in CONTEXT_LENGTH_MARKERS):
            code = "context_length_exceeded"
    return {"error": {"message": message, "type": err_type, "param": None, "code": code}}
