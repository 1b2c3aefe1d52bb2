"""Tests for the OpenAI <-> Anthropic translation layer (pure functions, no network)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from edgeroute.errors import EdgerouteError
from edgeroute.providers.anthropic_translate import (
    MessagesStreamTranslator,
    StreamUsage,
    TranslationError,
    UpstreamStreamError,
    anthropic_error_to_openai,
    chat_request_to_messages,
    messages_response_to_chat,
)

MODEL = "claude-sonnet-4-5"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def translate(**body: Any) -> dict[str, Any]:
    body.setdefault("model", "route-a")
    return chat_request_to_messages(body, model=MODEL)


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


# ---------------------------------------------------------------------------------------------
# Request translation
# ---------------------------------------------------------------------------------------------


class TestRequestBasics:
    def test_minimal_request(self) -> None:
        req = translate(messages=[user("hi")])
        assert req == {
            "model": MODEL,
            "max_tokens": 4096,
            "messages": [{"role": "user", "content": "hi"}],
        }

    def test_model_is_the_upstream_name_not_the_route(self) -> None:
        req = chat_request_to_messages(
            {"model": "my-route", "messages": [user("x")]}, model="claude-x"
        )
        assert req["model"] == "claude-x"

    def test_default_max_tokens_is_configurable(self) -> None:
        req = chat_request_to_messages(
            {"messages": [user("x")]}, model=MODEL, default_max_tokens=123
        )
        assert req["max_tokens"] == 123

    def test_max_tokens_passed(self) -> None:
        assert translate(messages=[user("x")], max_tokens=50)["max_tokens"] == 50

    def test_max_completion_tokens_wins_over_max_tokens(self) -> None:
        req = translate(messages=[user("x")], max_tokens=50, max_completion_tokens=70)
        assert req["max_tokens"] == 70

    @pytest.mark.parametrize(
        ("key", "value"),
        [
            ("max_tokens", 0),
            ("max_tokens", -3),
            ("max_completion_tokens", "10"),
            ("max_tokens", 1.5),
        ],
    )
    def test_bad_max_tokens(self, key: str, value: Any) -> None:
        with pytest.raises(TranslationError) as exc:
            translate(messages=[user("x")], **{key: value})
        assert exc.value.param == key

    def test_sampling_params(self) -> None:
        req = translate(messages=[user("x")], temperature=0.3, top_p=0.9, top_k=40)
        assert (req["temperature"], req["top_p"], req["top_k"]) == (0.3, 0.9, 40)

    def test_sampling_params_absent_when_not_sent(self) -> None:
        req = translate(messages=[user("x")])
        for key in ("temperature", "top_p", "top_k", "stop_sequences", "stream", "metadata"):
            assert key not in req

    def test_temperature_above_anthropic_range_is_rejected(self) -> None:
        with pytest.raises(TranslationError) as exc:
            translate(messages=[user("x")], temperature=1.5)
        assert exc.value.param == "temperature"

    def test_temperature_zero_and_one_accepted(self) -> None:
        assert translate(messages=[user("x")], temperature=0)["temperature"] == 0
        assert translate(messages=[user("x")], temperature=1)["temperature"] == 1

    def test_stop_string(self) -> None:
        assert translate(messages=[user("x")], stop="END")["stop_sequences"] == ["END"]

    def test_stop_list(self) -> None:
        req = translate(messages=[user("x")], stop=["a", "b"])
        assert req["stop_sequences"] == ["a", "b"]
        assert "stop" not in req

    def test_stop_empty_list_omitted(self) -> None:
        assert "stop_sequences" not in translate(messages=[user("x")], stop=[])

    def test_stop_invalid(self) -> None:
        with pytest.raises(TranslationError) as exc:
            translate(messages=[user("x")], stop=["ok", 3])
        assert exc.value.param == "stop"

    def test_stream_flag(self) -> None:
        assert translate(messages=[user("x")], stream=True)["stream"] is True
        assert "stream" not in translate(messages=[user("x")], stream=False)

    def test_user_becomes_metadata_user_id(self) -> None:
        req = translate(messages=[user("x")], user="user-42")
        assert req["metadata"] == {"user_id": "user-42"}

    def test_harmless_openai_fields_are_dropped(self) -> None:
        req = translate(
            messages=[user("x")],
            n=1,
            seed=7,
            presence_penalty=0.5,
            frequency_penalty=0.5,
            logit_bias={"50256": -100},
            store=True,
            service_tier="auto",
            metadata={"team": "a"},
            stream_options={"include_usage": True},
            response_format={"type": "text"},
            logprobs=False,
            parallel_tool_calls=True,
        )
        assert set(req) == {"model", "max_tokens", "messages"}

    def test_input_body_is_not_mutated(self) -> None:
        body = {
            "model": "r",
            "messages": [
                {"role": "system", "content": "sys"},
                user("a"),
                user("b"),
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{}"},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "r"},
            ],
            "tools": [WEATHER_TOOL],
        }
        snapshot = json.dumps(body, sort_keys=True)
        chat_request_to_messages(body, model=MODEL)
        assert json.dumps(body, sort_keys=True) == snapshot


class TestSystemPrompt:
    def test_system_extracted(self) -> None:
        req = translate(messages=[{"role": "system", "content": "Be terse."}, user("hi")])
        assert req["system"] == "Be terse."
        assert req["messages"] == [{"role": "user", "content": "hi"}]

    def test_system_and_developer_concatenated_in_order(self) -> None:
        req = translate(
            messages=[
                {"role": "system", "content": "One."},
                {"role": "developer", "content": "Two."},
                user("hi"),
                {"role": "system", "content": "Three."},
            ]
        )
        assert req["system"] == "One.\n\nTwo.\n\nThree."
        assert [m["role"] for m in req["messages"]] == ["user"]

    def test_system_content_parts_joined(self) -> None:
        req = translate(
            messages=[
                {
                    "role": "system",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
                user("hi"),
            ]
        )
        assert req["system"] == "a\nb"

    def test_empty_system_message_ignored(self) -> None:
        req = translate(messages=[{"role": "system", "content": ""}, user("hi")])
        assert "system" not in req

    def test_system_image_rejected(self) -> None:
        with pytest.raises(TranslationError) as exc:
            translate(
                messages=[
                    {
                        "role": "system",
                        "content": [{"type": "image_url", "image_url": {"url": "https://x/y"}}],
                    },
                    user("hi"),
                ]
            )
        assert exc.value.param == "messages[0].content[0]"

    def test_only_system_messages_is_an_error(self) -> None:
        with pytest.raises(TranslationError) as exc:
            translate(messages=[{"role": "system", "content": "x"}])
        assert exc.value.param == "messages"


class TestMultimodal:
    def test_text_parts_and_images(self) -> None:
        req = translate(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is in these?"},
                        {
                            "type": "image_url",
                            "image_url": {
                                "url": "data:image/png;base64,iVBORw0KGgo=",
                                "detail": "low",
                            },
                        },
                        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
                    ],
                }
            ]
        )
        assert req["messages"] == [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in these?"},
                    {
                        "type": "image",
                        "source": {
                            "type": "base64",
                            "media_type": "image/png",
                            "data": "iVBORw0KGgo=",
                        },
                    },
                    {
                        "type": "image",
                        "source": {"type": "url", "url": "https://example.com/cat.jpg"},
                    },
                ],
            }
        ]

    def test_image_url_as_bare_string(self) -> None:
        req = translate(
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": "data:image/jpeg;base64,/9j/"}],
                }
            ]
        )
        source = req["messages"][0]["content"][0]["source"]
        assert source == {"type": "base64", "media_type": "image/jpeg", "data": "/9j/"}

    def test_empty_text_parts_dropped(self) -> None:
        req = translate(
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "text", "text": ""}, {"type": "text", "text": "x"}],
                }
            ]
        )
        assert req["messages"][0]["content"] == [{"type": "text", "text": "x"}]

    def test_pdf_file_part_becomes_document(self) -> None:
        req = translate(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "file",
                            "file": {
                                "filename": "a.pdf",
                                "file_data": "data:application/pdf;base64,JVBERi0=",
                            },
                        }
                    ],
                }
            ]
        )
        assert req["messages"][0]["content"] == [
            {
                "type": "document",
                "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="},
            }
        ]

    @pytest.mark.parametrize(
        ("part", "param"),
        [
            (
                {"type": "image_url", "image_url": {"url": "data:image/png,rawbytes"}},
                "messages[0].content[1].image_url.url",
            ),
            (
                {"type": "image_url", "image_url": {"url": "ftp://host/img.png"}},
                "messages[0].content[1].image_url.url",
            ),
            ({"type": "image_url", "image_url": {}}, "messages[0].content[1].image_url.url"),
            (
                {"type": "input_audio", "input_audio": {"data": "x", "format": "wav"}},
                "messages[0].content[1]",
            ),
            (
                {"type": "file", "file": {"file_id": "file-abc"}},
                "messages[0].content[1].file.file_data",
            ),
            ({"type": "video", "video": {}}, "messages[0].content[1].type"),
            ({"type": "text"}, "messages[0].content[1].text"),
        ],
    )
    def test_bad_parts_name_the_param(self, part: dict[str, Any], param: str) -> None:
        with pytest.raises(TranslationError) as exc:
            translate(messages=[{"role": "user", "content": [{"type": "text", "text": "x"}, part]}])
        assert exc.value.param == param


class TestRoleMerging:
    def test_consecutive_user_messages_merge(self) -> None:
        req = translate(messages=[user("a"), user("b")])
        assert req["messages"] == [
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            }
        ]

    def test_consecutive_assistant_messages_merge(self) -> None:
        req = translate(
            messages=[
                user("q"),
                {"role": "assistant", "content": "part 1"},
                {"role": "assistant", "content": [{"type": "text", "text": "part 2"}]},
            ]
        )
        assert req["messages"][1] == {
            "role": "assistant",
            "content": [{"type": "text", "text": "part 1"}, {"type": "text", "text": "part 2"}],
        }

    def test_system_between_users_does_not_break_merge(self) -> None:
        req = translate(messages=[user("a"), {"role": "system", "content": "s"}, user("b")])
        assert len(req["messages"]) == 1
        assert req["system"] == "s"

    def test_roles_alternate_in_a_long_conversation(self) -> None:
        req = translate(
            messages=[
                user("1"),
                user("2"),
                {"role": "assistant", "content": "3"},
                user("4"),
                {"role": "assistant", "content": "5"},
                {"role": "assistant", "content": "6"},
            ]
        )
        roles = [m["role"] for m in req["messages"]]
        assert roles == ["user", "assistant", "user", "assistant"]

    def test_empty_assistant_message_dropped(self) -> None:
        req = translate(messages=[user("a"), {"role": "assistant", "content": ""}, user("b")])
        assert req["messages"] == [
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            }
        ]

    def test_merge_with_multimodal_message(self) -> None:
        req = translate(
            messages=[
                user("look"),
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "https://x/i.png"}}],
                },
            ]
        )
        assert req["messages"][0]["content"] == [
            {"type": "text", "text": "look"},
            {"type": "image", "source": {"type": "url", "url": "https://x/i.png"}},
        ]


def tool_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


class TestTools:
    def test_tool_definitions(self) -> None:
        req = translate(messages=[user("x")], tools=[WEATHER_TOOL])
        assert req["tools"] == [
            {
                "name": "get_weather",
                "description": "Current weather for a city",
                "input_schema": WEATHER_TOOL["function"]["parameters"],  # type: ignore[index]
            }
        ]
        # The schema is handed on by reference, not copied.
        assert req["tools"][0]["input_schema"] is WEATHER_TOOL["function"]["parameters"]  # type: ignore[index]

    def test_tool_without_parameters_or_description(self) -> None:
        req = translate(
            messages=[user("x")], tools=[{"type": "function", "function": {"name": "now"}}]
        )
        assert req["tools"] == [
            {"name": "now", "input_schema": {"type": "object", "properties": {}}}
        ]

    def test_bare_empty_schema_gets_object_type(self) -> None:
        req = translate(
            messages=[user("x")],
            tools=[{"type": "function", "function": {"name": "now", "parameters": {}}}],
        )
        assert req["tools"][0]["input_schema"] == {"type": "object"}

    def test_non_function_tool_rejected(self) -> None:
        with pytest.raises(TranslationError) as exc:
            translate(messages=[user("x")], tools=[WEATHER_TOOL, {"type": "custom", "custom": {}}])
        assert exc.value.param == "tools[1].type"

    def test_full_tool_conversation(self) -> None:
        req = translate(
            messages=[
                {"role": "system", "content": "You are a weather bot."},
                user("Weather in Paris and Rome?"),
                {
                    "role": "assistant",
                    "content": "Let me check.",
                    "tool_calls": [
                        tool_call("call_1", "get_weather", '{"city": "Paris"}'),
                        tool_call("call_2", "get_weather", '{"city": "Rome"}'),
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "18C sunny"},
                {
                    "role": "tool",
                    "tool_call_id": "call_2",
                    "content": [{"type": "text", "text": "22C cloudy"}],
                },
                user("Thanks, and tomorrow?"),
            ],
            tools=[WEATHER_TOOL],
        )
        assert req["system"] == "You are a weather bot."
        assert req["messages"] == [
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Let me check."},
                    {
                        "type": "tool_use",
                        "id": "call_1",
                        "name": "get_weather",
                        "input": {"city": "Paris"},
                    },
                    {
                        "type": "tool_use",
                        "id": "call_2",
                        "name": "get_weather",
                        "input": {"city": "Rome"},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": "18C sunny"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "call_2",
                        "content": [{"type": "text", "text": "22C cloudy"}],
                    },
                    {"type": "text", "text": "Thanks, and tomorrow?"},
                ],
            },
        ]

    def test_assistant_with_null_content_and_tool_calls(self) -> None:
        req = translate(
            messages=[
                user("q"),
                {"role": "assistant", "content": None, "tool_calls": [tool_call("c", "f", "")]},
                {"role": "tool", "tool_call_id": "c", "content": "ok"},
            ],
            tools=[WEATHER_TOOL],
        )
        assert req["messages"][1] == {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "c", "name": "f", "input": {}}],
        }

    def test_tool_results_go_before_text_in_a_user_turn(self) -> None:
        req = translate(
            messages=[
                {"role": "assistant", "content": None, "tool_calls": [tool_call("c", "f", "{}")]},
                user("note"),
                {"role": "tool", "tool_call_id": "c", "content": "ok"},
            ]
        )
        assert req["messages"][1]["content"] == [
            {"type": "tool_result", "tool_use_id": "c", "content": "ok"},
            {"type": "text", "text": "note"},
        ]

    def test_foreign_tool_ids_rewritten_consistently(self) -> None:
        req = translate(
            messages=[
                user("q"),
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [tool_call("functions.get_weather:0", "get_weather", "{}")],
                },
                {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "ok"},
            ]
        )
        use_id = req["messages"][1]["content"][0]["id"]
        result_id = req["messages"][2]["content"][0]["tool_use_id"]
        assert use_id == result_id == "functions_get_weather_0"

    @pytest.mark.parametrize(
        ("arguments", "message"),
        [("{not json", "not valid JSON"), ("[1, 2]", "JSON object"), ('"str"', "JSON object")],
    )
    def test_bad_tool_arguments(self, arguments: str, message: str) -> None:
        with pytest.raises(TranslationError, match=message) as exc:
            translate(
                messages=[
                    user("q"),
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [tool_call("a", "f", "{}"), tool_call("b", "f", arguments)],
                    },
                ]
            )
        assert exc.value.param == "messages[1].tool_calls[1].function.arguments"

    def test_tool_message_without_id(self) -> None:
        with pytest.raises(TranslationError) as exc:
            translate(messages=[user("q"), {"role": "tool", "content": "x"}])
        assert exc.value.param == "messages[1].tool_call_id"


class TestToolChoice:
    @pytest.mark.parametrize(
        ("choice", "expected"),
        [
            ("auto", {"type": "auto"}),
            ("none", {"type": "none"}),
            ("required", {"type": "any"}),
            (
                {"type": "function", "function": {"name": "get_weather"}},
                {"type": "tool", "name": "get_weather"},
            ),
        ],
    )
    def test_mapping(self, choice: Any, expected: dict[str, Any]) -> None:
        req = translate(messages=[user("x")], tools=[WEATHER_TOOL], tool_choice=choice)
        assert req["tool_choice"] == expected

    def test_absent_tool_choice_is_omitted(self) -> None:
        assert "tool_choice" not in translate(messages=[user("x")], tools=[WEATHER_TOOL])

    def test_parallel_tool_calls_false(self) -> None:
        req = translate(
            messages=[user("x")],
            tools=[WEATHER_TOOL],
            tool_choice="required",
            parallel_tool_calls=False,
        )
        assert req["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}

    def test_parallel_tool_calls_false_without_tool_choice(self) -> None:
        req = translate(messages=[user("x")], tools=[WEATHER_TOOL], parallel_tool_calls=False)
        assert req["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}

    def test_parallel_tool_calls_false_with_none(self) -> None:
        req = translate(
            messages=[user("x")],
            tools=[WEATHER_TOOL],
            tool_choice="none",
            parallel_tool_calls=False,
        )
        assert req["tool_choice"] == {"type": "none"}

    def test_auto_without_tools_dropped(self) -> None:
        assert "tool_choice" not in translate(messages=[user("x")], tool_choice="auto")

    def test_required_without_tools_rejected(self) -> None:
        with pytest.raises(TranslationError) as exc:
            translate(messages=[user("x")], tool_choice="required")
        assert exc.value.param == "tool_choice"

    @pytest.mark.parametrize(
        ("choice", "param"),
        [
            ("sometimes", "tool_choice"),
            ({"type": "function", "function": {}}, "tool_choice.function.name"),
            ({"type": "allowed_tools"}, "tool_choice"),
        ],
    )
    def test_invalid(self, choice: Any, param: str) -> None:
        with pytest.raises(TranslationError) as exc:
            translate(messages=[user("x")], tools=[WEATHER_TOOL], tool_choice=choice)
        assert exc.value.param == param


class TestTranslationErrors:
    def test_is_a_value_error_and_edgeroute_error(self) -> None:
        assert issubclass(TranslationError, ValueError)
        assert issubclass(TranslationError, EdgerouteError)

    @pytest.mark.parametrize(
        ("body", "param"),
        [
            ({"messages": [user("x")], "n": 2}, "n"),
            ({"messages": []}, "messages"),
            ({}, "messages"),
            ({"messages": "hi"}, "messages"),
            ({"messages": [user("x"), {"content": "no role"}]}, "messages[1].role"),
            ({"messages": [user("x"), {"role": "critic", "content": "?"}]}, "messages[1].role"),
            ({"messages": [{"role": "function", "name": "f", "content": "?"}]}, "messages[0].role"),
            ({"messages": ["just a string"]}, "messages[0]"),
            ({"messages": [{"role": "user", "content": 42}]}, "messages[0].content"),
            ({"messages": [user("x")], "logprobs": True}, "logprobs"),
            ({"messages": [user("x")], "top_logprobs": 3}, "top_logprobs"),
            (
                {"messages": [user("x")], "response_format": {"type": "json_object"}},
                "response_format.type",
            ),
            ({"messages": [user("x")], "modalities": ["text", "audio"]}, "modalities"),
            ({"messages": [user("x")], "functions": [{"name": "f"}]}, "functions"),
            ({"messages": [user("x")], "function_call": "auto"}, "function_call"),
        ],
    )
    def test_param_paths(self, body: dict[str, Any], param: str) -> None:
        with pytest.raises(TranslationError) as exc:
            chat_request_to_messages(body, model=MODEL)
        assert exc.value.param == param

    def test_to_openai_shape(self) -> None:
        with pytest.raises(TranslationError) as exc:
            chat_request_to_messages({"messages": [user("x")], "n": 3}, model=MODEL)
        assert exc.value.to_openai() == {
            "error": {
                "message": str(exc.value),
                "type": "invalid_request_error",
                "param": "n",
                "code": None,
            }
        }


# ---------------------------------------------------------------------------------------------
# Response translation
# ---------------------------------------------------------------------------------------------


def anthropic_message(
    content: list[dict[str, Any]], stop_reason: str, **usage: int
) -> dict[str, Any]:
    return {
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5-20250929",
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": usage or {"input_tokens": 12, "output_tokens": 6},
    }


class TestResponse:
    def test_text_response(self) -> None:
        resp = anthropic_message(
            [{"type": "text", "text": "Hello"}, {"type": "text", "text": " world"}], "end_turn"
        )
        out = messages_response_to_chat(resp, model="route-a", request_id="chatcmpl-xyz")
        assert out["id"] == "chatcmpl-xyz"
        assert out["object"] == "chat.completion"
        assert isinstance(out["created"], int)
        assert out["model"] == "route-a"
        assert out["choices"] == [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello world", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ]
        assert out["usage"] == {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18}
        parsed = ChatCompletion.model_validate(out)
        assert parsed.choices[0].message.content == "Hello world"

    def test_id_falls_back_to_upstream_id(self) -> None:
        out = messages_response_to_chat(anthropic_message([], "end_turn"), model="m")
        assert out["id"] == "msg_01XFDUDYJgAACzvnptvVoYEL"
        assert out["choices"][0]["message"]["content"] == ""

    def test_tool_use_response(self) -> None:
        resp = anthropic_message(
            [
                {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                {"type": "text", "text": "Checking."},
                {
                    "type": "tool_use",
                    "id": "toolu_01A09q90qw90lq917835lq9",
                    "name": "get_weather",
                    "input": {"city": "Paris", "units": ["c"], "note": "é"},
                },
            ],
            "tool_use",
        )
        out = messages_response_to_chat(resp, model="m")
        choice = out["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["content"] == "Checking."
        [call] = choice["message"]["tool_calls"]
        assert call["id"] == "toolu_01A09q90qw90lq917835lq9"
        assert call["type"] == "function"
        assert call["function"]["name"] == "get_weather"
        assert json.loads(call["function"]["arguments"]) == {
            "city": "Paris",
            "units": ["c"],
            "note": "é",
        }
        ChatCompletion.model_validate(out)

    def test_tool_only_response_has_null_content(self) -> None:
        resp = anthropic_message(
            [{"type": "tool_use", "id": "toolu_1", "name": "now", "input": {}}], "tool_use"
        )
        message = messages_response_to_chat(resp, model="m")["choices"][0]["message"]
        assert message["content"] is None
        assert message["tool_calls"][0]["function"]["arguments"] == "{}"

    @pytest.mark.parametrize(
        ("stop_reason", "finish_reason"),
        [
            ("end_turn", "stop"),
            ("stop_sequence", "stop"),
            ("max_tokens", "length"),
            ("tool_use", "tool_calls"),
            ("refusal", "content_filter"),
            ("pause_turn", "stop"),
            ("something_new", "stop"),
        ],
    )
    def test_stop_reason_mapping(self, stop_reason: str, finish_reason: str) -> None:
        out = messages_response_to_chat(anthropic_message([], stop_reason), model="m")
        assert out["choices"][0]["finish_reason"] == finish_reason

    def test_cache_tokens_count_as_prompt_tokens(self) -> None:
        resp = anthropic_message(
            [{"type": "text", "text": "x"}],
            "end_turn",
            input_tokens=10,
            cache_creation_input_tokens=100,
            cache_read_input_tokens=1000,
            output_tokens=5,
        )
        usage = messages_response_to_chat(resp, model="m")["usage"]
        assert usage == {
            "prompt_tokens": 1110,
            "completion_tokens": 5,
            "total_tokens": 1115,
            "prompt_tokens_details": {"cached_tokens": 1000},
        }

    def test_tools_round_trip(self) -> None:
        """A tool call returned to the client and sent back must reach Anthropic unchanged."""
        tool_input = {"city": "Paris", "days": 3, "opts": {"metric": True}}
        resp = anthropic_message(
            [{"type": "tool_use", "id": "toolu_9", "name": "get_weather", "input": tool_input}],
            "tool_use",
        )
        message = messages_response_to_chat(resp, model="m")["choices"][0]["message"]
        req = translate(
            messages=[
                user("weather?"),
                message,
                {"role": "tool", "tool_call_id": "toolu_9", "content": "sunny"},
            ],
            tools=[WEATHER_TOOL],
        )
        assert req["messages"][1] == {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "toolu_9", "name": "get_weather", "input": tool_input}
            ],
        }
        assert req["messages"][2]["content"][0]["tool_use_id"] == "toolu_9"


# ---------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------


def message_start(input_tokens: int = 25, **extra: int) -> tuple[str, dict[str, Any]]:
    return (
        "message_start",
        {
            "type": "message_start",
            "message": {
                "id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY",
                "type": "message",
                "role": "assistant",
                "content": [],
                "model": "claude-sonnet-4-5-20250929",
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": input_tokens, "output_tokens": 1, **extra},
            },
        },
    )


TEXT_STREAM: list[tuple[str, dict[str, Any]]] = [
    message_start(),
    (
        "content_block_start",
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    ),
    ("ping", {"type": "ping"}),
    (
        "content_block_delta",
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": "Hello"},
        },
    ),
    (
        "content_block_delta",
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "!"}},
    ),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": 15},
        },
    ),
    ("message_stop", {"type": "message_stop"}),
]


def run(
    translator: MessagesStreamTranslator, events: list[tuple[str, dict[str, Any]]]
) -> list[dict[str, Any]]:
    chunks: list[dict[str, Any]] = []
    for event, data in events:
        chunks.extend(translator.feed(event, data))
    return chunks


def deltas(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c["choices"][0]["delta"] for c in chunks if c["choices"]]


class TestStreamText:
    def test_text_stream(self) -> None:
        t = MessagesStreamTranslator(model="route-a", include_usage=False)
        chunks = run(t, TEXT_STREAM)
        assert deltas(chunks) == [
            {"role": "assistant", "content": ""},
            {"content": "Hello"},
            {"content": "!"},
            {},
        ]
        assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "stop"]
        for chunk in chunks:
            assert chunk["object"] == "chat.completion.chunk"
            assert chunk["model"] == "route-a"
            assert chunk["id"] == "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY"
            assert "usage" not in chunk
            ChatCompletionChunk.model_validate(chunk)
        assert len({c["created"] for c in chunks}) == 1
        assert t.usage == StreamUsage(prompt_tokens=25, completion_tokens=15)
        assert t.usage.total_tokens == 40
        assert t.finish_reason == "stop"

    def test_request_id_overrides_upstream_id(self) -> None:
        t = MessagesStreamTranslator(model="m", include_usage=False, request_id="chatcmpl-mine")
        assert {c["id"] for c in run(t, TEXT_STREAM)} == {"chatcmpl-mine"}

    def test_usage_chunk(self) -> None:
        t = MessagesStreamTranslator(model="m", include_usage=True)
        chunks = run(t, TEXT_STREAM)
        *body, last = chunks
        assert all(c["usage"] is None for c in body)
        assert last["choices"] == []
        assert last["usage"] == {"prompt_tokens": 25, "completion_tokens": 15, "total_tokens": 40}
        assert last["object"] == "chat.completion.chunk"
        parsed = ChatCompletionChunk.model_validate(last)
        assert parsed.usage is not None and parsed.usage.total_tokens == 40

    def test_usage_with_cache_tokens(self) -> None:
        t = MessagesStreamTranslator(model="m", include_usage=True)
        events = [
            message_start(
                input_tokens=5, cache_creation_input_tokens=0, cache_read_input_tokens=2000
            ),
            *TEXT_STREAM[1:],
        ]
        last = run(t, events)[-1]
        assert last["usage"] == {
            "prompt_tokens": 2005,
            "completion_tokens": 15,
            "total_tokens": 2020,
            "prompt_tokens_details": {"cached_tokens": 2000},
        }
        assert t.usage == (2005, 15)

    def test_message_delta_input_tokens_update_usage(self) -> None:
        t = MessagesStreamTranslator(model="m", include_usage=False)
        run(t, [message_start(input_tokens=10)])
        t.feed(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn"},
                "usage": {"input_tokens": 30, "output_tokens": 7},
            },
        )
        assert t.usage == StreamUsage(30, 7)

    @pytest.mark.parametrize(
        ("stop_reason", "finish_reason"),
        [("max_tokens", "length"), ("stop_sequence", "stop"), ("tool_use", "tool_calls")],
    )
    def test_finish_reason_mapping(self, stop_reason: str, finish_reason: str) -> None:
        t = MessagesStreamTranslator(model="m", include_usage=False)
        run(t, [message_start()])
        [chunk] = t.feed(
            "message_delta",
            {"type": "message_delta", "delta": {"stop_reason": stop_reason}, "usage": {}},
        )
        assert chunk["choices"][0]["finish_reason"] == finish_reason

    def test_ping_and_unknown_events_yield_nothing(self) -> None:
        t = MessagesStreamTranslator(model="m", include_usage=True)
        assert t.feed("ping", {"type": "ping"}) == []
        assert t.feed("brand_new_event", {"type": "brand_new_event"}) == []

    def test_event_name_may_come_from_payload(self) -> None:
        t = MessagesStreamTranslator(model="m", include_usage=False)
        chunks = run(t, [("", data) for _, data in TEXT_STREAM])
        assert deltas(chunks)[1] == {"content": "Hello"}

    def test_thinking_blocks_are_skipped(self) -> None:
        t = MessagesStreamTranslator(model="m", include_usage=False)
        chunks = run(
            t,
            [
                message_start(),
                (
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": 0,
                        "content_block": {"type": "thinking", "thinking": ""},
                    },
                ),
                (
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "thinking_delta", "thinking": "let me think"},
                    },
                ),
                (
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "signature_delta", "signature": "EqQB"},
                    },
                ),
                ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ],
        )
        assert deltas(chunks) == [{"role": "assistant", "content": ""}]

    def test_missing_message_delta_still_finishes(self) -> None:
        t = MessagesStreamTranslator(model="m", include_usage=False)
        chunks = run(t, [*TEXT_STREAM[:6], ("message_stop", {"type": "message_stop"})])
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"

    def test_error_event_raises(self) -> None:
        t = MessagesStreamTranslator(model="m", include_usage=False)
        run(t, TEXT_STREAM[:4])
        with pytest.raises(UpstreamStreamError) as exc:
            t.feed(
                "error",
                {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
            )
        assert exc.value.message == "Overloaded"
        assert exc.value.error_type == "overloaded_error"
        assert str(exc.value) == "Overloaded"


TOOL_STREAM: list[tuple[str, dict[str, Any]]] = [
    message_start(input_tokens=472),
    (
        "content_block_start",
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    ),
    (
        "content_block_delta",
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": "Checking both."},
        },
    ),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    (
        "content_block_start",
        {
            "type": "content_block_start",
            "index": 1,
            "content_block": {
                "type": "tool_use",
                "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
                "name": "get_weather",
                "input": {},
            },
        },
    ),
    (
        "content_block_delta",
        {
            "type": "content_block_delta",
            "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": ""},
        },
    ),
    (
        "content_block_delta",
        {
            "type": "content_block_delta",
            "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": '{"city": "Pa'},
        },
    ),
    (
        "content_block_delta",
        {
            "type": "content_block_delta",
            "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": 'ris"}'},
        },
    ),
    ("content_block_stop", {"type": "content_block_stop", "index": 1}),
    (
        "content_block_start",
        {
            "type": "content_block_start",
            "index": 2,
            "content_block": {
                "type": "tool_use",
                "id": "toolu_02",
                "name": "get_weather",
                "input": {},
            },
        },
    ),
    (
        "content_block_delta",
        {
            "type": "content_block_delta",
            "index": 2,
            "delta": {"type": "input_json_delta", "partial_json": '{"city": "Rome"}'},
        },
    ),
    ("content_block_stop", {"type": "content_block_stop", "index": 2}),
    (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use", "stop_sequence": None},
            "usage": {"output_tokens": 89},
        },
    ),
    ("message_stop", {"type": "message_stop"}),
]


class TestStreamTools:
    def test_tool_call_stream(self) -> None:
        t = MessagesStreamTranslator(model="m", include_usage=True)
        chunks = run(t, TOOL_STREAM)
        for chunk in chunks:
            ChatCompletionChunk.model_validate(chunk)
        assert deltas(chunks) == [
            {"role": "assistant", "content": ""},
            {"content": "Checking both."},
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": ""},
                    }
                ]
            },
            {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Pa'}}]},
            {"tool_calls": [{"index": 0, "function": {"arguments": 'ris"}'}}]},
            {
                "tool_calls": [
                    {
                        "index": 1,
                        "id": "toolu_02",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": ""},
                    }
                ]
            },
            {"tool_calls": [{"index": 1, "function": {"arguments": '{"city": "Rome"}'}}]},
            {},
        ]
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert finish[-1] == "tool_calls"
        assert chunks[-1]["usage"] == {
            "prompt_tokens": 472,
            "completion_tokens": 89,
            "total_tokens": 561,
        }
        assert t.usage == StreamUsage(472, 89)

    def test_accumulated_arguments_parse(self) -> None:
        """What an OpenAI client reassembles from the deltas must be the tool's JSON input."""
        t = MessagesStreamTranslator(model="m", include_usage=False)
        calls: dict[int, dict[str, str]] = {}
        for delta in deltas(run(t, TOOL_STREAM)):
            for call in delta.get("tool_calls", ()):
                entry = calls.setdefault(call["index"], {"id": "", "name": "", "arguments": ""})
                entry["id"] += call.get("id", "")
                entry["name"] += call.get("function", {}).get("name", "")
                entry["arguments"] += call["function"]["arguments"]
        assert {i: json.loads(c["arguments"]) for i, c in calls.items()} == {
            0: {"city": "Paris"},
            1: {"city": "Rome"},
        }
        assert calls[0]["id"] == "toolu_01T1x1fJ34qAmk2tNTrN7Up6"

    def test_json_delta_for_unannounced_block_is_ignored(self) -> None:
        t = MessagesStreamTranslator(model="m", include_usage=False)
        run(t, [message_start()])
        assert (
            t.feed(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 5,
                    "delta": {"type": "input_json_delta", "partial_json": '{"q": 1}'},
                },
            )
            == []
        )


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def anthropic_error(error_type: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type, "message": message}}


class TestErrorMapping:
    @pytest.mark.parametrize(
        ("status", "error_type", "openai_type", "code"),
        [
            (400, "invalid_request_error", "invalid_request_error", None),
            (401, "authentication_error", "authentication_error", "invalid_api_key"),
            (403, "permission_error", "permission_error", None),
            (404, "not_found_error", "not_found_error", None),
            (413, "request_too_large", "invalid_request_error", "request_too_large"),
            (429, "rate_limit_error", "rate_limit_error", "rate_limit_exceeded"),
            (402, "billing_error", "insufficient_quota", "insufficient_quota"),
            (500, "api_error", "server_error", None),
            (529, "overloaded_error", "server_error", "overloaded"),
        ],
    )
    def test_known_types(
        self, status: int, error_type: str, openai_type: str, code: str | None
    ) -> None:
        out = anthropic_error_to_openai(status, anthropic_error(error_type, "boom"))
        assert out == {
            "error": {"message": "boom", "type": openai_type, "param": None, "code": code}
        }

    def test_context_length_is_recognised(self) -> None:
        out = anthropic_error_to_openai(
            400,
            anthropic_error("invalid_request_error", "prompt is too long: 210000 tokens > 200000"),
        )
        assert out["error"]["code"] == "context_length_exceeded"
        assert out["error"]["type"] == "invalid_request_error"

    @pytest.mark.parametrize(
        ("status", "openai_type", "code"),
        [
            (429, "rate_limit_error", "rate_limit_exceeded"),
            (503, "server_error", None),
            (418, "invalid_request_error", None),
        ],
    )
    def test_unknown_or_malformed_body_falls_back_on_status(
        self, status: int, openai_type: str, code: str | None
    ) -> None:
        out = anthropic_error_to_openai(status, {})
        assert out == {
            "error": {
                "message": f"upstream returned HTTP {status}",
                "type": openai_type,
                "param": None,
                "code": code,
            }
        }

    def test_unknown_error_type_uses_status(self) -> None:
        out = anthropic_error_to_openai(503, anthropic_error("brand_new_error", "nope"))
        assert out["error"] == {
            "message": "nope",
            "type": "server_error",
            "param": None,
            "code": None,
        }
