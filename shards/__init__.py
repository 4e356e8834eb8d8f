"""The shared kernel of the two phases: the shard format, and the config loader both use.

precompute/ writes shards and train/ reads them; neither imports the other. What both need
lives here and depends on neither: the on-disk contract (schema, codec, writer, reader,
manifest, checksums, fingerprints, top-k conversion, errors) and `typed_config`, the
YAML-plus-`key=value` loader of their frozen config dataclasses. The rule: a module belongs in
shards/ only if both phases (or tools/) use it and it imports nothing from precompute/,
train/ or tools/; anything one phase alone uses stays in that phase.
"""
