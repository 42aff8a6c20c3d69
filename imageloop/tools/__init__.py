"""Retrieval and generation tools: embedders, vector stores, indexer, retriever, generators, artifacts."""
