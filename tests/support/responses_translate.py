"""A Responses request through the gateway's translation to the neuron's chat request, for unit tests."""

from __future__ import annotations

from typing import Any

import pytest

from cortex.core.errors import ApiError
from cortex.core.openai import ChatCompletionRequest
from cortex.gateway.dialects.responses.request import parse_responses_request
from cortex.gateway.dialects.responses.to_chat import to_chat_request


def translate(**fields: Any) -> dict[str, Any]:
    """The chat request a Responses request becomes (input "hi" unless given); it must satisfy the contract."""
    chat = to_chat_request(parse_responses_request({"model": "m", "input": "hi", **fields}))
    ChatCompletionRequest.model_validate(chat)
    return chat


def rejected(**fields: Any) -> ApiError:
    """The 400 a Responses request gets from the translation."""
    with pytest.raises(ApiError) as caught:
        to_chat_request(parse_responses_request({"model": "m", **fields}))
    assert caught.value.status == 400
    return caught.value
