"""The Nextflow module and example pipeline in workflow/nextflow, checked without Nextflow.

Nextflow and nf-test are not available on the build machines, so the module is checked in
three ways that do not need them:

* two real parsers read every file: reftrace (the Nextflow grammar, compiled from Go) for the
  process directives and the pipeline's include, and groovy-parser (a Groovy 3 grammar on Lark)
  for inputs, outputs, emits, the ``script:``/``stub:`` templates and the config files;
* the container names must be derived from ``container/IMAGE`` and the pins of
  ``environment.yml`` from the package version;
* the ``script:`` template is rendered for a test meta map and ``task.ext.args`` the way
  Nextflow would render it, run through the real ``harmony-step`` command on real data, and the
  files it leaves must be exactly the declared outputs.

The renderer only substitutes plain references (``${prefix}``, ``${task.cpus}``); the
statements before the template are compared token by token with the Groovy that
``script_values`` mirrors, so a change to one without the other fails here.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import pytest
import yaml

import harmony_step

reftrace = pytest.importorskip("reftrace", reason="reftrace is in the 'test' extra")
groovy_parser = pytest.importorskip(
    "groovy_parser.parser", reason="groovy-parser is in the 'test' extra"
)
from lark import Token, Tree  # noqa: E402  (lark comes with groovy-parser)

REPO = Path(__file__).resolve().parent.parent
NEXTFLOW_DIR = REPO / "workflow" / "nextflow"
MODULE_DIR = NEXTFLOW_DIR / "modules" / "local" / "harmony_step"
MODULE = MODULE_DIR / "main.nf"
PIPELINE = NEXTFLOW_DIR / "main.nf"
PIPELINE_CONFIG = NEXTFLOW_DIR / "nextflow.config"
IMAGE = (REPO / "container" / "IMAGE").read_text().strip()
PROCESS = "HARMONY_STEP"

# The Groovy statements that run before the script template; script_values() mirrors them.
SCRIPT_PREAMBLE = """
if (!meta.batch_key) error "HARMONY_STEP: meta.batch_key is not set for '${meta.id}'; set it to the obs column (or list of columns) that holds the batches."
def args = task.ext.args ?: ''
prefix = task.ext.prefix ?: "${meta.id}_harmony"
if ("${h5ad}" == "${prefix}.h5ad") error "HARMONY_STEP: input and output would both be named '${h5ad}'; set task.ext.prefix to another name."
def device = task.accelerator?.request ? 'gpu' : 'cpu'
def batch_keys = [meta.batch_key].flatten().collect { key -> "--key '${key}'" }.join(' ')
def label_key = meta.label_key ? "--label-key '${meta.label_key}'" : ''
def plot = task.ext.plot == false ? '' : "--plot ${prefix}.convergence.png"
"""
STUB_PREAMBLE = """
prefix = task.ext.prefix ?: "${meta.id}_harmony"
"""


# --------------------------------------------------------------------------- parsing helpers


@functools.cache
def parse_groovy(path: Path) -> Tree:
    """The Groovy 3 parse tree of ``path`` (raises lark's parse errors on bad syntax)."""
    return groovy_parser.parse_groovy_content(path.read_text())


def _tokens(node: Tree | Token) -> list[Token]:
    if isinstance(node, Token):
        return [node]
    return list(node.scan_values(lambda value: isinstance(value, Token)))


def _words(node: Tree | Token) -> list[str]:
    """The decoded token texts of ``node``: a whitespace- and layout-free view of its source."""
    return [token.value[1] for token in _tokens(node)]


def _find(node: Tree, name: str) -> Iterator[Tree]:
    """Subtrees named ``name``, outermost first (lark's own find_data goes innermost first)."""
    return (subtree for subtree in node.iter_subtrees_topdown() if subtree.data == name)


def _child_trees(node: Tree, name: str) -> list[Tree]:
    return [child for child in node.children if isinstance(child, Tree) and child.data == name]


def _first(node: Tree, name: str) -> Tree:
    found = next(_find(node, name), None)
    if found is None:
        raise AssertionError(f"no {name!r} node under {node.data!r}")
    return found


def _block_statements(closure: Tree) -> list[Tree]:
    """The statements of a ``{ ... }`` closure, in order."""
    block = _first(closure, "block")
    statements = next(_find(block, "block_statements"), None)
    if statements is None:
        return []
    return _child_trees(statements, "block_statement")


def _label(statement: Tree) -> tuple[str | None, Tree]:
    """Split a Groovy labelled statement (``input:`` ... ) into its label and inner statement."""
    inner = statement.children[0] if statement.data == "block_statement" else statement
    if isinstance(inner, Tree) and inner.data == "statement":
        kids = [c for c in inner.children if not (isinstance(c, Tree) and c.data == "nls")]
        if (
            len(kids) == 3
            and isinstance(kids[0], Tree)
            and kids[0].data == "identifier"
            and isinstance(kids[1], Token)
            and kids[1].type == "COLON"
        ):
            return _words(kids[0])[0], kids[2]
    return None, statement


def _command(statement: Tree) -> tuple[str, list[Tree]] | None:
    """``name arg, arg`` (a Groovy command expression) as its head name and argument nodes."""
    command = next(_find(statement, "command_expression"), None)
    if command is None or len(command.children) != 2:
        return None
    head, arguments = command.children
    if not (isinstance(arguments, Tree) and arguments.data == "argument_list"):
        return None
    head_words = _words(head)
    elements = [c for c in arguments.children if isinstance(c, Tree) and c.data != "nls"]
    return ".".join(w for w in head_words if w != "."), elements


def _closure_argument(elements: list[Tree]) -> Tree | None:
    if len(elements) != 1:
        return None
    primary = next(_find(elements[0], "primary"), None)
    if primary is None or not primary.children:
        return None
    only = primary.children[0]
    if isinstance(only, Tree) and only.data == "closure_or_lambda_expression":
        return only
    return None


@dataclass(frozen=True)
class Template:
    """A Groovy string split into literal text and ``${reference}`` parts."""

    parts: tuple[tuple[str, str], ...]  # ("text", decoded text) or ("ref", "meta.id")

    @property
    def source(self) -> str:
        return "".join(
            value if kind == "text" else "${" + value + "}" for kind, value in self.parts
        )

    def render(self, values: dict[str, object]) -> str:
        missing = [value for kind, value in self.parts if kind == "ref" and value not in values]
        if missing:
            raise KeyError(f"the template refers to {missing}, which the test does not define")
        return "".join(
            value if kind == "text" else str(values[value]) for kind, value in self.parts
        )


def _template(node: Tree) -> Template:
    """The Template of a string literal or GString node (anything else is an error)."""
    string_node = node if node.data in {"gstring", "static_gstring", "string_literal"} else None
    if string_node is None:
        string_node = next(
            (n for n in node.iter_subtrees_topdown() if n.data in {"gstring", "string_literal"}),
            None,
        )
    if string_node is None:
        raise AssertionError(f"expected a string, found {' '.join(_words(node))!r}")
    parts: list[tuple[str, str]] = []
    for child in string_node.children:
        if isinstance(child, Token):
            if child.type in {"STRING_LITERAL_PART", "STRING_LITERAL"}:
                parts.append(("text", child.value[1]))
            continue
        if child.data == "static_gstring":
            parts.extend(_template(child).parts)
        elif child.data == "gstring_value":
            parts.append(("ref", _reference(child)))
    return Template(tuple(parts))


def _reference(gstring_value: Tree) -> str:
    """``${a.b.c}`` or ``$a.b`` as "a.b.c"; anything more than a dotted name is refused."""
    inner = [t for t in _tokens(gstring_value) if t.type not in {"LBRACE", "RBRACE"}]
    if not inner or any(t.type not in {"IDENTIFIER", "DOT"} for t in inner):
        raise AssertionError(
            "the script template may only interpolate plain names such as ${prefix}; found "
            + "".join(t.value[1] for t in inner)
            + ". Compute the value in a `def` line before the template instead."
        )
    return "".join(t.value[1] for t in inner)


@dataclass(frozen=True)
class Declaration:
    """One input or output line: its qualifiers with their arguments, and its options."""

    shape: tuple[tuple[str, str], ...]  # (qualifier, name or template source)
    options: tuple[tuple[str, str], ...]  # (option, value), e.g. ("emit", "h5ad")
    templates: tuple[Template, ...]  # the path patterns, for rendering


QUALIFIERS = {"val", "path", "file", "env", "stdin", "stdout", "tuple", "eval"}


def _declaration(statement: Tree) -> Declaration:
    command = _command(statement)
    if command is None:
        raise AssertionError(f"not a declaration: {' '.join(_words(statement))!r}")
    head, elements = command
    shape: list[tuple[str, str]] = []
    options: list[tuple[str, str]] = []
    templates: list[Template] = []
    for element in elements:
        named = next(_find(element, "named_property_arg"), None)
        if named is not None:
            label_words = _words(_first(named, "named_property_arg_label"))
            value = _words(named)[len(label_words) :]
            options.append((label_words[0], "".join(value).removeprefix(":")))
            continue
        qualifier, argument = _qualified_argument(element)
        if qualifier is None:  # `path "versions.yml"`: the head is the qualifier
            qualifier = head
        if argument.data in {"gstring", "string_literal", "static_gstring"} or next(
            _find(argument, "gstring"), None
        ):
            template = _template(argument)
            templates.append(template)
            shape.append((qualifier, template.source))
        else:
            shape.append((qualifier, "".join(_words(argument))))
    if head == "tuple":
        shape = [("tuple", ""), *shape]
    return Declaration(tuple(shape), tuple(options), tuple(templates))


def _qualified_argument(element: Tree) -> tuple[str | None, Tree]:
    """``val(meta)`` as ("val", <meta>); a bare argument as (None, <argument>)."""
    path_expression = next(_find(element, "path_expression"), None)
    if path_expression is not None and len(path_expression.children) == 2:
        primary, call = path_expression.children
        name = _words(primary)
        arguments = next(_find(call, "enhanced_argument_list_in_par"), None)
        if len(name) == 1 and name[0] in QUALIFIERS and arguments is not None:
            return name[0], arguments
    primary = next(_find(element, "primary"))
    return None, primary


@dataclass(frozen=True)
class ProcessDefinition:
    directives: tuple[tuple[str, tuple[str, ...]], ...]
    sections: dict[str, list[Tree]]


def process_definition(path: Path, name: str) -> ProcessDefinition:
    """The directives and the labelled sections (input, output, when, script, stub) of ``name``."""
    tree = parse_groovy(path)
    for statement in _find(tree, "script_statement"):
        command = _command(statement)
        if command is None or command[0] != "process":
            continue
        (argument,) = command[1]
        path_expression = _first(argument, "path_expression")
        if _words(path_expression.children[0]) != [name]:
            continue
        closure = _first(path_expression.children[1], "closure")
        directives: list[tuple[str, tuple[str, ...]]] = []
        sections: dict[str, list[Tree]] = {}
        current: str | None = None
        for block_statement in _block_statements(closure):
            label, inner = _label(block_statement)
            if label is not None:
                current = label
                sections[current] = [inner]
            elif current is None:
                head, arguments = _command(block_statement) or ("?", [])
                directives.append((head, tuple(" ".join(_words(a)) for a in arguments)))
            else:
                sections[current].append(block_statement)
        return ProcessDefinition(tuple(directives), sections)
    raise AssertionError(f"no `process {name}` in {path}")


def script_parts(statements: list[Tree]) -> tuple[list[list[str]], Template]:
    """The statements before the template (as token lists) and the template itself."""
    *preamble, template = statements
    return [_words(s) for s in preamble], _template(template)


def statement_words(groovy: str) -> list[list[str]]:
    """Token lists of each statement in a Groovy snippet, parsed by the same parser."""
    tree = groovy_parser.parse_groovy_content(groovy)
    return [_words(s) for s in _find(tree, "script_statement")]


# --------------------------------------------------------------------- config flattening


def config_settings(path: Path) -> dict[str, Tree]:
    """Every assignment of a Nextflow config as {"scope.sub.name": value node}.

    ``withLabel: 'x' { ... }`` and ``withName: 'x' { ... }`` become scopes ``withLabel:x``.
    """
    settings: dict[str, Tree] = {}
    _collect_settings(parse_groovy(path).children, (), settings)
    return settings


def _collect_settings(nodes: list, scope: tuple[str, ...], out: dict[str, Tree]) -> None:
    for node in nodes:
        if not isinstance(node, Tree):
            continue
        if node.data in {"script_statements", "compilation_unit"}:
            _collect_settings(node.children, scope, out)
        elif node.data in {"script_statement", "block_statement"}:
            _collect_statement(node, scope, out)


def _collect_statement(statement: Tree, scope: tuple[str, ...], out: dict[str, Tree]) -> None:
    label, inner = _label(statement)
    command = _command(inner)
    if command is not None:
        head, elements = command
        closure = _closure_argument(elements)
        if closure is not None:
            name = f"{label}:{_template(_first(inner, 'primary')).source}" if label else head
            nested = next(_find(closure, "block_statements"), None)
            if nested is not None:
                _collect_settings(_child_trees(nested, "block_statement"), (*scope, name), out)
            return
    expression = next(_find(inner, "expression"), None)
    if expression is not None:
        kids = [c for c in expression.children if not (isinstance(c, Tree) and c.data == "nls")]
        if len(kids) == 3 and isinstance(kids[1], Token) and kids[1].type == "ASSIGN":
            key = "".join(_words(kids[0]))
            out[".".join((*scope, key))] = kids[2]


def literal(node: Tree) -> object:
    """A config value that is a single literal, as Python; anything else is an error."""
    words = _words(node)
    tokens = _tokens(node)
    if len(tokens) == 1:
        token = tokens[0]
        if token.type == "STRING_LITERAL":
            return token.value[1]
        if token.type == "BOOLEAN_LITERAL":
            return token.value[1] == "true"
        if token.type in {"INTEGER_LITERAL", "FLOATING_POINT_LITERAL"}:
            return int(token.value[1]) if token.value[1].isdigit() else float(token.value[1])
    if tokens and tokens[0].type == "GSTRING_BEGIN":
        return _template(node)
    raise AssertionError(f"not a literal: {' '.join(words)!r}")


def strings_in(node: Tree) -> set[str]:
    return {t.value[1] for t in _tokens(node) if t.type == "STRING_LITERAL"}


# ------------------------------------------------------------ what the script would receive


def script_values(
    meta: dict[str, object],
    staged_input: str,
    *,
    ext_args: str | None = None,
    ext_prefix: str | None = None,
    ext_plot: bool | None = None,
    accelerator_request: int | None = None,
    cpus: int = 2,
) -> dict[str, object]:
    """The values of SCRIPT_PREAMBLE for one task, computed as Groovy would compute them."""
    if not meta.get("batch_key"):
        raise ValueError("meta.batch_key is not set")
    prefix = ext_prefix or f"{meta['id']}_harmony"
    if staged_input == f"{prefix}.h5ad":
        raise ValueError("input and output would both be named the same")
    batch_keys = meta["batch_key"] if isinstance(meta["batch_key"], list) else [meta["batch_key"]]
    label_key = meta.get("label_key")
    return {
        "meta.id": meta["id"],
        "h5ad": staged_input,
        "args": ext_args or "",
        "prefix": prefix,
        "device": "gpu" if accelerator_request else "cpu",
        "batch_keys": " ".join(f"--key '{key}'" for key in batch_keys),
        "label_key": f"--label-key '{label_key}'" if label_key else "",
        "plot": "" if ext_plot is False else f"--plot {prefix}.convergence.png",
        "task.cpus": cpus,
        "task.process": PROCESS,
    }


def bash_script(template: Template, values: dict[str, object]) -> str:
    """The task script: the rendered template with its common indentation removed.

    Nextflow strips the common indentation of the script string, which is what lets the
    indented ``END_VERSIONS`` line close the here-document.
    """
    return textwrap.dedent(template.render(values)).lstrip("\n")


def run_task(
    tmp_path: Path, section: str, input_file: Path, values: dict[str, object]
) -> tuple[subprocess.CompletedProcess[str], Path, Path]:
    """Stage ``input_file`` like Nextflow (a symlink), write .command.sh and run it with bash."""
    work = tmp_path / "work"
    work.mkdir()
    (work / str(values["h5ad"])).symlink_to(input_file)
    _preamble, template = script_parts(process_definition(MODULE, PROCESS).sections[section])
    script = work / ".command.sh"
    script.write_text(bash_script(template, values))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    bash = shutil.which("bash")
    assert bash is not None
    result = subprocess.run(
        [bash, "-euo", "pipefail", script.name],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    return result, work, script


def declared_outputs(values: dict[str, object]) -> dict[str, str]:
    """{emit name: file name} of the module's file outputs rendered for one task."""
    outputs = {}
    for statement in process_definition(MODULE, PROCESS).sections["output"]:
        declaration = _declaration(statement)
        if not any(qualifier == "path" for qualifier, _ in declaration.shape):
            continue  # the versions tuple: values, not files
        (template,) = declaration.templates
        outputs[dict(declaration.options)["emit"]] = template.render(values)
    return outputs


def optional_outputs() -> set[str]:
    """Emit names of the outputs declared ``optional: true``."""
    declarations = map(_declaration, process_definition(MODULE, PROCESS).sections["output"])
    return {dict(d.options)["emit"] for d in declarations if ("optional", "true") in d.options}


def versions_eval_command() -> str:
    """The shell command of the versions output's ``eval(...)``."""
    declarations = map(_declaration, process_definition(MODULE, PROCESS).sections["output"])
    (command,) = [
        value for d in declarations for qualifier, value in d.shape if qualifier == "eval"
    ]
    return command


def produced_files(work: Path, staged_input: str) -> set[str]:
    return {p.name for p in work.iterdir()} - {staged_input, ".command.sh"}


def assert_versions_eval(work: Path) -> None:
    """Nextflow runs the eval command in the task folder after the script; it prints the version."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(
        ["bash", "-c", versions_eval_command()],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == harmony_step.__version__


# ==================================================================================== tests


def test_module_parses_with_the_nextflow_grammar() -> None:
    module = reftrace.Module.from_file(str(MODULE))
    assert not isinstance(module, reftrace.ParseError), module
    assert [process.name for process in module.processes] == [PROCESS]


def test_reftrace_rejects_a_broken_module(tmp_path: Path) -> None:
    """The parser is not a rubber stamp: a truncated copy of the module is refused."""
    broken = tmp_path / "main.nf"
    broken.write_text("\n".join(MODULE.read_text().splitlines()[:20]))
    assert isinstance(reftrace.Module.from_file(str(broken)), reftrace.ParseError)
    with pytest.raises(Exception, match="Unexpected"):
        groovy_parser.parse_groovy_content(broken.read_text())


def test_directives_tag_label_and_conda() -> None:
    (process,) = reftrace.Module.from_file(str(MODULE)).processes
    assert [tag.tag for tag in process.tags] == ["${meta.id}"]
    assert [label.value for label in process.labels] == ["process_gpu"]
    assert [list(conda.possible_values) for conda in process.condas] == [
        ["$moduleDir/environment.yml"]
    ]
    # The Groovy grammar sees the same directives, and nothing else before `input:`.
    directives = process_definition(MODULE, PROCESS).directives
    assert [name for name, _arguments in directives] == ["tag", "label", "conda", "container"]


def test_container_names_come_from_container_image_file() -> None:
    (process,) = reftrace.Module.from_file(str(MODULE)).processes
    (container,) = process.containers
    assert container.format.name == "TERNARY"
    assert "workflow.containerEngine" in container.condition
    assert "singularity" in container.condition
    assert "apptainer" in container.condition
    assert container.true_name == f"docker://{IMAGE}"
    assert container.false_name == IMAGE
    # The image tag is the package version, so the container runs the code under test.
    assert IMAGE.rsplit(":", 1)[1] == harmony_step.__version__


def test_input_is_a_meta_map_and_one_h5ad() -> None:
    sections = process_definition(MODULE, PROCESS).sections
    inputs = [_declaration(s) for s in sections["input"]]
    assert [d.shape for d in inputs] == [(("tuple", ""), ("val", "meta"), ("path", "h5ad"))]


def test_outputs_and_emits() -> None:
    sections = process_definition(MODULE, PROCESS).sections
    outputs = [(d.shape, d.options) for d in map(_declaration, sections["output"])]
    assert outputs == [
        ((("tuple", ""), ("val", "meta"), ("path", "${prefix}.h5ad")), (("emit", "h5ad"),)),
        (
            (("tuple", ""), ("val", "meta"), ("path", "${prefix}.convergence.tsv")),
            (("emit", "convergence"),),
        ),
        (
            (("tuple", ""), ("val", "meta"), ("path", "${prefix}.summary.json")),
            (("emit", "summary"),),
        ),
        (
            (("tuple", ""), ("val", "meta"), ("path", "${prefix}.convergence.png")),
            (("emit", "plot"), ("optional", "true")),
        ),
        (
            (
                ("tuple", ""),
                ("val", "${task.process}"),
                ("val", "harmony-step"),
                ("eval", "harmony-step --version | sed 's/^harmony-step //'"),
            ),
            (("emit", "versions_harmony_step"), ("topic", "versions")),
        ),
    ]
    assert optional_outputs() == {"plot"}


def test_sections_and_when_clause() -> None:
    sections = process_definition(MODULE, PROCESS).sections
    assert list(sections) == ["input", "output", "when", "script", "stub"]
    assert [_words(s) for s in sections["when"]] == statement_words(
        "task.ext.when == null || task.ext.when"
    )


def test_script_preamble_is_what_script_values_mirrors() -> None:
    sections = process_definition(MODULE, PROCESS).sections
    preamble, _ = script_parts(sections["script"])
    assert preamble == statement_words(SCRIPT_PREAMBLE)
    stub_preamble, _ = script_parts(sections["stub"])
    assert stub_preamble == statement_words(STUB_PREAMBLE)


def test_rendered_command_for_the_test_meta_map() -> None:
    _preamble, template = script_parts(process_definition(MODULE, PROCESS).sections["script"])
    meta = {"id": "cells", "batch_key": ["dataset", "donor"], "label_key": "cell_type"}
    values = script_values(meta, "cells.h5ad", ext_args="--theta 1.5 --random-state 3")
    script = bash_script(template, values)
    assert script.splitlines()[:12] == [
        "export OMP_NUM_THREADS=2",
        "harmony-step run \\",
        "    --input cells.h5ad \\",
        "    --output cells_harmony.h5ad \\",
        "    --key 'dataset' --key 'donor' \\",
        "    --label-key 'cell_type' \\",
        "    --convergence cells_harmony.convergence.tsv \\",
        "    --summary cells_harmony.summary.json \\",
        "    --plot cells_harmony.convergence.png \\",
        "    --device cpu \\",
        "    --threads 2 \\",
        "    --theta 1.5 --random-state 3",
    ]
    gpu = bash_script(template, script_values(meta, "cells.h5ad", accelerator_request=1))
    assert "    --device gpu \\" in gpu.splitlines()
    no_plot = bash_script(template, script_values(meta, "cells.h5ad", ext_plot=False))
    assert "--plot" not in no_plot
    # The module writes no versions file: its version is an eval output on the versions topic.
    assert "versions.yml" not in script
    assert "END_VERSIONS" not in script


def test_renderer_refuses_expressions_in_the_template(tmp_path: Path) -> None:
    """Only plain references are rendered; an expression would make the rendering a guess."""
    module = tmp_path / "main.nf"
    module.write_text(
        'process P {\n    input:\n    val x\n\n    script:\n    """\n    echo ${x.toUpperCase()}\n    """\n}\n'
    )
    with pytest.raises(AssertionError, match="plain names"):
        script_parts(process_definition(module, "P").sections["script"])


def test_meta_yml_matches_the_module() -> None:
    meta_yml = yaml.safe_load((MODULE_DIR / "meta.yml").read_text())
    assert meta_yml["name"] == "harmony_step"
    assert [list(item) for item in meta_yml["input"][0]] == [["meta"], ["h5ad"]]
    sections = process_definition(MODULE, PROCESS).sections
    declared = {
        dict(d.options)["emit"]: d.shape[-1][1] for d in map(_declaration, sections["output"])
    }
    # meta.yml lists each output as [[meta, file]] for tuples or [file] for a bare path.
    documented = {
        emit: next(iter(entries[0][-1] if isinstance(entries[0], list) else entries[0]))
        for emit, entries in meta_yml["output"].items()
    }
    assert documented == declared
    # The versions topic is documented as nf-core does: process, tool name and eval command.
    (topic_entry,) = meta_yml["topics"]["versions"]
    assert [next(iter(item)) for item in topic_entry] == [
        "${task.process}",
        "harmony-step",
        versions_eval_command(),
    ]
    assert [next(iter(item.values()))["type"] for item in topic_entry] == [
        "string",
        "string",
        "eval",
    ]
    assert topic_entry == meta_yml["output"]["versions_harmony_step"][0]


def test_environment_yml_pins_the_package_version() -> None:
    environment = yaml.safe_load((MODULE_DIR / "environment.yml").read_text())
    conda = [d for d in environment["dependencies"] if isinstance(d, str)]
    (pip_section,) = [d["pip"] for d in environment["dependencies"] if isinstance(d, dict)]
    assert all(re.fullmatch(r"conda-forge::[\w.-]+=[\d.]+", d) for d in conda), conda
    assert all(re.fullmatch(r"[\w.-]+==[\w.]+", d) for d in pip_section), pip_section
    assert f"harmony-step=={harmony_step.__version__}" in pip_section


def test_environment_yml_matches_the_image_lock_file() -> None:
    lock = REPO / "container" / "requirements-cuda12.lock"
    if not lock.exists():
        pytest.skip("container/requirements-cuda12.lock is not in this checkout")
    locked = dict(re.findall(r"^([\w.-]+)==([\w.]+)", lock.read_text(), flags=re.MULTILINE))
    environment = yaml.safe_load((MODULE_DIR / "environment.yml").read_text())
    (pip_section,) = [d["pip"] for d in environment["dependencies"] if isinstance(d, dict)]
    pinned = dict(
        entry.split("==") for entry in pip_section if not entry.startswith("harmony-step")
    )
    assert {name: locked.get(name) for name in pinned} == pinned


def test_pipeline_includes_the_module() -> None:
    pipeline = reftrace.Module.from_file(str(PIPELINE))
    assert not isinstance(pipeline, reftrace.ParseError), pipeline
    [(source, names)] = [
        (i.from_module, [item.name for item in i.items]) for i in pipeline.includes
    ]
    assert names == [PROCESS]
    assert (PIPELINE.parent / f"{source}.nf").resolve() == MODULE
    assert [w.name for w in pipeline.workflows] == [""]  # the entry workflow
    parse_groovy(PIPELINE)  # and it is valid Groovy as a whole


def test_pipeline_config_profiles() -> None:
    settings = config_settings(PIPELINE_CONFIG)
    profiles = {key.split(".")[1] for key in settings if key.startswith("profiles.")}
    assert profiles == {"docker", "apptainer", "singularity", "gpu", "test"}
    assert literal(settings["profiles.docker.docker.enabled"]) is True
    assert literal(settings["profiles.apptainer.apptainer.enabled"]) is True
    assert literal(settings["profiles.singularity.singularity.enabled"]) is True
    gpu = "profiles.gpu.process.withLabel:process_gpu"
    assert literal(settings[f"{gpu}.accelerator"]) == 1
    options = settings[f"{gpu}.containerOptions"]
    assert {"docker", "--gpus all", "--nv"} <= strings_in(options)
    assert "workflow.containerEngine" in "".join(_words(options))
    assert literal(settings["manifest.version"]) == harmony_step.__version__


def test_pipeline_test_profile_points_at_real_data() -> None:
    settings = config_settings(PIPELINE_CONFIG)
    data = literal(settings["profiles.test.params.input"])
    assert isinstance(data, Template)
    path = Path(data.render({"projectDir": NEXTFLOW_DIR}))
    assert path.resolve() == (REPO / "tests/data/pbmc_3500/pbmc_3500.h5ad").resolve()
    assert path.exists()
    with h5py.File(path) as handle:
        assert literal(settings["profiles.test.params.batch_key"]) in handle["obs"]


def test_module_test_files_parse() -> None:
    for path in [
        MODULE_DIR / "tests" / "main.nf.test",
        MODULE_DIR / "tests" / "nextflow.config",
        MODULE_DIR / "tests" / "gpu.config",
        MODULE_DIR / "tests" / "no_plot.config",
        NEXTFLOW_DIR / "nf-test.config",
        NEXTFLOW_DIR / "tests" / "nextflow.config",
    ]:
        parse_groovy(path)
    gpu = config_settings(MODULE_DIR / "tests" / "gpu.config")
    assert literal(gpu["process.withName:HARMONY_STEP.accelerator"]) == 1
    no_plot = config_settings(MODULE_DIR / "tests" / "no_plot.config")
    assert literal(no_plot["process.withName:HARMONY_STEP.ext.plot"]) is False


def test_script_block_runs_harmony_step_on_pbmc(tmp_path: Path, data_dir: Path) -> None:
    meta = {"id": "pbmc_3500", "batch_key": "donor"}
    values = script_values(meta, "pbmc_3500.h5ad", ext_args="--max-iter-harmony 3 --random-state 0")
    result, work, _script = run_task(
        tmp_path, "script", data_dir / "pbmc_3500" / "pbmc_3500.h5ad", values
    )
    assert result.returncode == 0, result.stderr
    outputs = declared_outputs(values)
    assert produced_files(work, "pbmc_3500.h5ad") == set(outputs.values())
    assert outputs["h5ad"] == "pbmc_3500_harmony.h5ad"
    assert_versions_eval(work)
    with h5py.File(work / outputs["h5ad"]) as handle:
        assert handle["obsm"]["X_pca_harmony"].shape == (3500, 30)
    summary = json.loads((work / outputs["summary"]).read_text())
    assert summary["device"]["kind"] == "cpu"
    assert summary["parameters"]["max_iter_harmony"] == 3
    assert 1 <= summary["n_rounds"] <= 3
    header = (work / outputs["convergence"]).read_text().splitlines()[0].split("\t")
    assert "objective" in header
    assert (work / outputs["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_script_block_passes_label_key_and_several_batch_keys(
    tmp_path: Path, data_dir: Path
) -> None:
    meta = {"id": "cell_lines", "batch_key": ["dataset"], "label_key": "cell_type"}
    values = script_values(meta, "cell_lines.h5ad", ext_args="--max-iter-harmony 2", cpus=1)
    result, work, _script = run_task(
        tmp_path, "script", data_dir / "cell_lines" / "cell_lines.h5ad", values
    )
    assert result.returncode == 0, result.stderr
    outputs = declared_outputs(values)
    assert produced_files(work, "cell_lines.h5ad") == set(outputs.values())
    summary = json.loads((work / outputs["summary"]).read_text())
    assert summary["metrics"]["before"]
    assert summary["metrics"]["after"]


def test_script_block_reports_a_missing_batch_column(tmp_path: Path, data_dir: Path) -> None:
    values = script_values({"id": "pbmc_3500", "batch_key": "no_such_column"}, "pbmc_3500.h5ad")
    result, work, _script = run_task(
        tmp_path, "script", data_dir / "pbmc_3500" / "pbmc_3500.h5ad", values
    )
    assert result.returncode == 2
    assert "no_such_column" in result.stderr
    assert produced_files(work, "pbmc_3500.h5ad") == set()  # nothing half-written


def test_stub_block_touches_every_declared_output(tmp_path: Path, data_dir: Path) -> None:
    values = script_values({"id": "pbmc_3500", "batch_key": "donor"}, "pbmc_3500.h5ad")
    result, work, _script = run_task(
        tmp_path, "stub", data_dir / "pbmc_3500" / "pbmc_3500.h5ad", values
    )
    assert result.returncode == 0, result.stderr
    outputs = declared_outputs(values)
    assert produced_files(work, "pbmc_3500.h5ad") == set(outputs.values())


def test_plot_is_left_out_with_ext_plot_false(tmp_path: Path, data_dir: Path) -> None:
    meta = {"id": "pbmc_3500", "batch_key": "donor"}
    values = script_values(
        meta, "pbmc_3500.h5ad", ext_args="--max-iter-harmony 2 --metrics-cells 0", ext_plot=False
    )
    result, work, _script = run_task(
        tmp_path, "script", data_dir / "pbmc_3500" / "pbmc_3500.h5ad", values
    )
    assert result.returncode == 0, result.stderr
    outputs = declared_outputs(values)
    produced = produced_files(work, "pbmc_3500.h5ad")
    assert produced == {name for emit, name in outputs.items() if emit != "plot"}


@pytest.mark.gpu
def test_script_block_runs_on_the_gpu_with_an_accelerator(tmp_path: Path, data_dir: Path) -> None:
    meta = {"id": "pbmc_3500", "batch_key": "donor"}
    values = script_values(meta, "pbmc_3500.h5ad", accelerator_request=1)
    result, work, _script = run_task(
        tmp_path, "script", data_dir / "pbmc_3500" / "pbmc_3500.h5ad", values
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((work / declared_outputs(values)["summary"]).read_text())
    assert summary["device"]["kind"] == "gpu"
