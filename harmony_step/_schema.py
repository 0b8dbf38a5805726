"""The Harmony part of the workflow's config schema, generated from the parameter table.

``workflow/schemas/config.schema.yaml`` is written by hand except for the blocks between a
``# >>> generated: NAME`` line and a ``# <<< generated: NAME`` line, which come from
:data:`harmony_step._params.PARAMETERS`. After a change to the table, rewrite them with::

    python -m harmony_step._schema workflow/schemas/config.schema.yaml

A test fails while the committed file differs from what this writes.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from harmony_step._params import PARAMETERS, ParameterSpec

DATASET_LEVEL = ("basis", "adjusted_basis")
"""Parameters set per dataset, next to its input file, rather than in the ``harmony`` section."""

TOP_LEVEL = ("device", "n_gpus")
"""Parameters set once at the top of the config (a dataset's ``params`` may still override them);
the config names them by their key (``gpus`` for ``n_gpus``)."""

_REGION = re.compile(
    r"^(?P<indent>[ ]*)# >>> generated: (?P<name>[a-z -]+)\n.*?^[ ]*# <<< generated: (?P=name)\n",
    re.MULTILINE | re.DOTALL,
)


def _entry(spec: ParameterSpec, description: str, *, default: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"description": f"{description} Allowed: {spec.kind.allowed()}."}
    entry.update(spec.kind.schema())
    if default:
        entry["default"] = spec.default
    return entry


def _shared() -> list[ParameterSpec]:
    return [p for p in PARAMETERS if p.name not in DATASET_LEVEL + TOP_LEVEL]


def blocks() -> dict[str, dict[str, Any]]:
    """The generated blocks by region name: each a mapping of config keys to their schemas."""
    top = {
        spec.key: _entry(spec, f"{spec.help}.", default=True)
        for spec in PARAMETERS
        if spec.name in TOP_LEVEL
    }
    top["harmony"] = {
        "type": "object",
        "additionalProperties": False,
        "description": "Harmony parameters shared by every dataset (a dataset's `params` replaces "
        "single values). Names, meanings and defaults are those of "
        "harmony_step.harmony_integrate and of the harmony-step command's flags.",
        "default": {},
        "properties": {
            spec.name: _entry(spec, f"{spec.help}.", default=True) for spec in _shared()
        },
    }
    dataset = {
        spec.name: _entry(spec, f"{spec.help}.", default=True)
        for spec in PARAMETERS
        if spec.name in DATASET_LEVEL
    }
    overrides = {
        spec.name: _entry(spec, f"Overrides harmony.{spec.name} for this dataset.", default=False)
        for spec in _shared()
    }
    for spec in PARAMETERS:
        if spec.name in TOP_LEVEL:
            where = f"Overrides the top-level {spec.key} for this dataset."
            overrides[spec.key] = _entry(spec, where, default=False)
    dataset["params"] = {
        "type": "object",
        "additionalProperties": False,
        "description": "Harmony parameters for this dataset only; each replaces the value of the "
        "same name in the `harmony` section (or the top-level `device` and `gpus`). Empty by "
        "default: the dataset uses the shared values.",
        # No defaults inside: validation would fill them in and override the shared values.
        "default": {},
        "properties": overrides,
    }
    return {"top-level parameters": top, "dataset parameters": dataset}


def _render(block: dict[str, Any], indent: str) -> str:
    import yaml

    class Dumper(yaml.SafeDumper):
        """Long texts folded (``>-``), short lists inline, no anchors."""

        def ignore_aliases(self, data: Any) -> bool:
            return True

    def text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
        style = ">" if len(value) > 60 else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    dumped = yaml.dump(
        block, Dumper=Dumper, sort_keys=False, default_flow_style=None, width=92 - len(indent)
    )
    return "".join(f"{indent}{line}\n" for line in dumped.splitlines())


def update(text: str) -> str:
    """``text`` (the schema file) with every generated block rewritten from the table.

    Raises
    ------
    ValueError
        A region of :func:`blocks` has no markers in ``text``.
    """
    generated = blocks()
    found: set[str] = set()

    def replace(match: re.Match[str]) -> str:
        name, indent = match["name"], match["indent"]
        if name not in generated:
            raise ValueError(f"Unknown generated region {name!r}; known: {sorted(generated)}.")
        found.add(name)
        return (
            f"{indent}# >>> generated: {name}\n"
            f"{_render(generated[name], indent)}"
            f"{indent}# <<< generated: {name}\n"
        )

    result = _REGION.sub(replace, text)
    missing = sorted(set(generated) - found)
    if missing:
        raise ValueError(f"The schema has no '# >>> generated: NAME' region for {missing}.")
    return result


def main(argv: list[str] | None = None) -> int:
    """Rewrite the generated blocks of the schema file named by the only argument."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m harmony_step._schema SCHEMA.yaml\n")
        return 2
    path = Path(args[0])
    path.write_text(update(path.read_text(encoding="utf-8")), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
