"""Vector stores behind an index: the embedded store (SQLite + exact/HNSW search) and Weaviate."""
