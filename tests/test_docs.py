"""Docs that cannot drift: every command in README.md (and docs/, where there is one) that runs bnsuite names
options that exist, with values that parse, and its plugin example runs (tests/test_plugins.py)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from bnsuite import docs
from bnsuite.core import baseline, registry, report
from bnsuite.core.spec import SpecError
from bnsuite.executor import EXECUTORS
from bnsuite.study import study_from_options

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}
PLACEHOLDER = re.compile(r"[A-Z][A-Z_]*(:[A-Z_]+)?")  # MODULE, DIR, RESULTS, HOST:PORT
STAND_IN = "<placeholder>"
# The options of bnsuite.plugin whose values are study options (bnsuite.study.study_from_options).
STUDY_OPTIONS = ("profile", "studies", "dataset", "variants", "batch-sizes", "seeds", "epochs", "lr", "device",
                 "target-loss")


def doc_text(path: Path) -> tuple[list[str], str]:
    """The lines of a document's shell blocks (continuations joined), and its prose."""
    shell, prose, fence = [], [], None
    for line in path.read_text().splitlines():
        marker = re.match(r"\s*```(\w*)", line)
        if marker:
            fence = None if fence is not None else marker.group(1)
        elif fence is None:
            prose.append(line)
        elif fence in SHELL_FENCES:
            shell.append(line)
    return "\n".join(shell).replace("\\\n", " ").splitlines(), "\n".join(prose)


def bnsuite_commands(path: Path) -> list[str]:
    """Every command of `path` that runs bnsuite: `pytest ... --bn-*`, `python -m bnsuite.report|baseline ...`."""
    shell, prose = doc_text(path)
    found = []
    for line in shell + re.findall(r"`([^`]+)`", prose):
        if line.lstrip().startswith("#"):
            continue
        for part in re.split(r"&&|;|\|\|", line.split(" # ")[0]):
            if re.search(r"\bpytest\b.*--bn-|-m bnsuite\.(report|baseline)\b", part):
                found.append(part.strip())
    return found


COMMANDS = [(path.name, command) for path in DOCS for command in bnsuite_commands(path)]


@pytest.fixture(scope="module")
def pytest_options() -> set[str]:
    """Every long option `pytest --help` lists here, the bnsuite plugin's and pytest-benchmark's included."""
    text = subprocess.run([sys.executable, "-m", "pytest", "--help"], capture_output=True, text=True, check=True,
                          cwd=ROOT).stdout
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", text))


@pytest.fixture
def readme_plugin(clean_registry, monkeypatch, tmp_path):
    """The docs' plugin examples (the README's variants, the worked example's package), importable, as a user
    running their commands has them."""
    from test_plugins import readme_example

    for module in ("my_norms", "my_study"):
        (tmp_path / f"{module}.py").write_text(readme_example(f"{module}.py"))
        monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))


def words_of(command: str) -> list[str]:
    """A command's words, each placeholder (MODULE, DIR, [--baseline DIR], ...) as one stand-in value."""
    words = [word.strip("[]") for word in shlex.split(command)]
    return [STAND_IN if PLACEHOLDER.fullmatch(word) else word for word in words if word != "..."]


def test_the_docs_show_the_commands_this_test_checks():
    assert len(COMMANDS) >= 10 and any("--bn-plugin" in command for _, command in COMMANDS)


def test_every_bn_option_the_docs_mention_exists(pytest_options):
    mentioned = {option for path in DOCS for option in re.findall(r"--bn-[a-z][a-z-]*[a-z]", path.read_text())}
    assert mentioned and not mentioned - pytest_options, "options the docs name that do not exist"


@pytest.mark.parametrize(("doc", "command"), COMMANDS, ids=[f"{doc}: {command}" for doc, command in COMMANDS])
def test_a_documented_command_names_options_that_exist_with_values_that_parse(doc, command, pytest_options,
                                                                               readme_plugin):
    words = words_of(command)
    for module, parser in (("bnsuite.report", report.command_line), ("bnsuite.baseline", baseline.command_line)):
        if module in words:
            try:
                parser().parse_args(words[words.index(module) + 1:])
            except SystemExit as error:
                pytest.fail(f"{command!r} does not parse (exit {error.code})")
            return
    arguments = words[words.index("pytest") + 1:]
    unknown = [word.split("=")[0] for word in arguments if word.startswith("--")
               and word.split("=")[0] not in pytest_options]
    assert not unknown, f"{command!r} names options pytest does not have here: {unknown}"
    values = {}
    for index, word in enumerate(arguments):
        if word.startswith("--bn-"):
            name, _, value = word.removeprefix("--bn-").partition("=")
            value = value or (arguments[index + 1] if index + 1 < len(arguments) else "")
            if value != STAND_IN:
                values[name] = value
    installed = ["my_study"] if "my-digits" in words else []  # the worked example's package, by its entry point
    registry.load_plugins([*registry.plugin_option(values.get("plugin")), *installed], entry_points=False)
    assert values.get("executor", "local") in EXECUTORS
    study = {name.replace("-", "_"): value for name, value in values.items() if name in STUDY_OPTIONS}
    try:
        study_from_options(study.pop("profile", "full"), **study)
    except SpecError as error:
        if "sees no CUDA GPU" not in str(error):  # a value that parses, on a machine without a GPU
            pytest.fail(f"{command!r}: {error}")


def test_the_tables_that_list_what_the_code_defines_are_made_from_the_code():
    assert not docs.stale(), "run python -m bnsuite.docs to rewrite the generated tables"


def test_a_generated_block_without_its_markers_is_one_clear_error():
    with pytest.raises(ValueError, match="has no block <!-- bnsuite:options -->"):
        docs.render("# a page\n", {"options": docs.options_table}, path="docs/x.md")


def _slug(heading: str) -> str:
    """The anchor the repository host makes of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_between_the_documents_leads_somewhere():
    broken = []
    for path in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.exists():
                broken.append(f"{path.name}: {target}")
            elif anchor and linked.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", linked.read_text(), flags=re.M)
                if anchor not in {_slug(heading) for heading in headings}:
                    broken.append(f"{path.name}: {target} (no such heading)")
    assert not broken


def test_the_readme_copies_no_measured_figure():
    _, prose = doc_text(ROOT / "README.md")
    prose = re.sub(r"<!-- bnsuite:(\w+) -->.*?<!-- /bnsuite:\1 -->", "", prose, flags=re.S)  # what the code defines
    figures = re.findall(r"\d+(?:[.,]\d+)*\s*(?:%|x\b|s\b|GFLOP|GB/s|ms\b)|\d+\.\d+", prose.replace("3.11+", ""))
    assert not figures, "measured figures belong in the reference report, linked from the README"
