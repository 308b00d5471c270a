"""The dialects the gateway speaks to clients, one package each: OpenAI (the neuron's own, passed
through), Anthropic Messages and OpenAI Responses (translated to and from OpenAI chat)."""
