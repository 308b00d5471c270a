"""OpenAI Responses (stateless): `/v1/responses`, translated to and from OpenAI chat."""
