"""The loops, one module each, as LangGraph state machines."""
