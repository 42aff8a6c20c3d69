"""An image folder's index: opening and creating it, the indexer that fills it, the retriever that reads it."""
