"""The chain indexer: hub events -> channel rows, confirmed blocks only, reorg handling."""
