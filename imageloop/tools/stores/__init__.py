"""Vector stores behind an index: the embedded store (SQLite and one vector file), Chroma and Weaviate."""
