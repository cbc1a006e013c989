"""langchain-tests' integration suite for ChatGptOss, the tests a scripted backend can pass honestly.

The backend replays real harmony completions (analysis, then the final answer), tokenized with the
real o200k_harmony encoding, so what is tested is ChatGptOss itself: rendering the conversation
(tool-message histories, multi-turn), parsing, sync and async paths, streaming with usage, stop
sequences. Tests that judge a model's choices (which tool it calls, structured output content) need
a real model and are left to a GPU run.
"""

from __future__ import annotations

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests

from ossforge.agents import ChatGptOss, ScriptedBackend

pytestmark = pytest.mark.asyncio(loop_scope="function")  # the suite's async tests (pytest-asyncio, strict mode)

REPLY = "<|channel|>analysis<|message|>Say hello.<|end|><|start|>assistant<|channel|>final<|message|>Hello! Nice to meet you.<|return|>"


class TestChatGptOssIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self):
        return ChatGptOss

    @property
    def chat_model_params(self):
        return {"backend": ScriptedBackend([REPLY], cycle=True), "model": "gpt-oss-test"}

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supports_image_inputs(self) -> bool:
        return False

    @property
    def model_override_value(self) -> str:
        return "med"  # a per-call model= (a vLLM --lora-modules name) reported in response_metadata


# Tests that judge the model's own choices: that it decides to call `magic_function` with input 3,
# fills a schema with a joke, and so on. A scripted reply cannot make those choices without
# hard-coding each test's answer, so they are marked as expected failures here (the suite's own
# convention) and belong to a run against a real gpt-oss (e.g. ChatGptOss(base_url=...) on vLLM).
NEEDS_A_REAL_MODEL = [
    "test_tool_calling", "test_tool_calling_async", "test_bind_runnables_as_tools", "test_tool_choice",
    "test_tool_calling_with_no_arguments", "test_structured_output", "test_structured_output_async",
    "test_structured_output_pydantic_2_v1", "test_structured_output_optional_param", "test_agent_loop",
    "test_unicode_tool_call_integration",
]


def _expected_failure(name: str):
    import functools
    import inspect

    base = getattr(ChatModelIntegrationTests, name)
    if inspect.iscoroutinefunction(base):
        @functools.wraps(base)
        async def run(*args, **kwargs):
            return await base(*args, **kwargs)
    else:
        @functools.wraps(base)
        def run(*args, **kwargs):
            return base(*args, **kwargs)
    return pytest.mark.xfail(reason="needs a real model's choice of tool / structured content", strict=True)(run)


for _name in NEEDS_A_REAL_MODEL:
    setattr(TestChatGptOssIntegration, _name, _expected_failure(_name))
