"""OpenAI wire models. Pydantic only: nothing here knows about engines or HTTP."""
