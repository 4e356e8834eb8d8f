"""The shard format: the on-disk contract between precompute/ and train/.

precompute/ writes shards and train/ reads them; neither imports the other. This package
holds the contract and nothing else: schema, codec, writer, reader, manifest, checksums,
compaction, storage (local folders and fsspec URLs), tokenizer fingerprints, the top-k
conversion into the shards' arrays, and errors. It imports nothing from precompute/, train/,
tools/, runtime/, vllm_engine/ or datafiles/.
"""
