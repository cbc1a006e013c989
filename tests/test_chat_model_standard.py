"""langchain-tests' standard unit suite for ChatGptOss (scripted backend: real harmony tokens)."""

from __future__ import annotations

from langchain_tests.unit_tests import ChatModelUnitTests

from ossforge.agents import ChatGptOss, ScriptedBackend


class TestChatGptOssStandard(ChatModelUnitTests):
    @property
    def chat_model_class(self):
        return ChatGptOss

    @property
    def chat_model_params(self):
        return {"backend": ScriptedBackend(["<|channel|>final<|message|>Hello!<|return|>"], cycle=True),
                "model": "gpt-oss-test"}

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def returns_usage_metadata(self) -> bool:
        return True
