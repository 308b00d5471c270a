"""OpenAI chat and text completions: the neuron's own dialect, passed through."""
