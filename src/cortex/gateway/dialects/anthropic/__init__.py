"""Anthropic Messages: `/v1/messages` and `/v1/messages/count_tokens`, translated to and from OpenAI chat."""
