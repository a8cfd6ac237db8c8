"""tools/*.py are shims over the package's command lines, and every console script names one."""

import ast
import importlib
import re

from conftest import ROOT

TOOLS = sorted((ROOT / "tools").glob("*.py"))


def imported(tool) -> list[str]:
    tree = ast.parse(tool.read_text())
    return [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names] + [
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
    ]


def test_each_tool_imports_only_the_package_and_runs_its_main():
    """A tool never imports another tool nor edits sys.path: the installed package is its only source."""
    for tool in TOOLS:
        modules = [m for m in imported(tool) if m != "sys"]
        assert len(modules) == 1 and modules[0].startswith("viq_megatron.cli."), (tool, modules)
        assert "sys.path" not in tool.read_text(), tool
        assert callable(importlib.import_module(modules[0]).main), tool


def test_every_console_script_names_a_main_and_every_tool_has_one():
    scripts = dict(re.findall(r'"(viq-[a-z-]+)=([\w.]+:\w+)"', (ROOT / "setup.py").read_text()))
    for target in scripts.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), target
    tools = {m for tool in TOOLS for m in imported(tool) if m != "sys"}
    assert tools <= {target.split(":")[0] for target in scripts.values()}, tools
