"""VLM backends side by side: OpenAI-compatible endpoints, local transformers models, LangChain chat models."""
