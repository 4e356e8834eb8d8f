"""precompute --help lists each config key with the value in effect, not only the code's."""

from __future__ import annotations

import dataclasses

from precompute.__main__ import config_file, parser
from precompute.config import PrecomputeConfig


def test_help_shows_the_config_files_values_and_where_they_come_from(tmp_path):
    yaml_file = tmp_path / "p.yaml"
    yaml_file.write_text("k: 7\nsampling:\n  max_tokens: 11\n")
    text = parser(str(yaml_file)).format_help()
    built_in = PrecomputeConfig()
    assert f"  k=7  [{yaml_file}; built-in {built_in.k!r}]" in text
    assert (
        f"  sampling.max_tokens=11  [{yaml_file}; built-in {built_in.sampling.max_tokens!r}]"
        in text
    )
    # A key the file leaves alone shows the built-in value, unmarked.
    assert f"  mode={built_in.mode!r}\n" in text
    assert f"the values in effect with {yaml_file}" in text


def test_help_without_a_config_file_says_so():
    text = parser("").format_help()
    assert "the built-in defaults (no config file)" in text
    assert "built-in " + repr(PrecomputeConfig().k) not in text
    assert f"  k={PrecomputeConfig().k!r}\n" in text


def test_help_lists_every_key():
    text = parser("").format_help()

    def keys(cls, prefix=""):
        for f in dataclasses.fields(cls):
            value = getattr(cls(), f.name)
            if dataclasses.is_dataclass(value):
                yield from keys(type(value), f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}"

    for key in keys(PrecomputeConfig):
        assert f"\n  {key}=" in text, key


def test_config_file_follows_the_argv():
    assert config_file(["--config", "a.yaml", "k=1"]) == "a.yaml"
    assert config_file(["--config=b.yaml"]) == "b.yaml"
    assert config_file(["--config", ""]) == ""
