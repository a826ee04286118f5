"""OpenAI-compatible serving API under /v1: `model` names a base or an adapter reference."""
