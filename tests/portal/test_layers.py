"""The layers of the code: the import-linter contracts hold (.importlinter, also run by .ci/run), every module of the
project has a place in them, and no module of the project imports itself through others, function-level imports
included (grimp reads those too)."""

import configparser
import subprocess
import sys
from pathlib import Path

import grimp
from django.conf import settings

PACKAGES = ("api", "queues", "monitoring", "migration", "portal")


def cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    modules = sorted(graph.modules)
    edges = {module: sorted(graph.find_modules_directly_imported_by(module)) for module in modules}
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = 0
    for root in modules:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            module, position = work.pop()
            if position == 0:
                index[module] = low[module] = counter
                counter += 1
                stack.append(module)
                on_stack.add(module)
            if position < len(edges[module]):
                work.append((module, position + 1))
                target = edges[module][position]
                if target not in index:
                    work.append((target, 0))
                elif target in on_stack:
                    low[module] = min(low[module], index[target])
                continue
            for target in edges[module]:
                if target in on_stack:
                    low[module] = min(low[module], low[target])
            if low[module] == index[module]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == module:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_module_imports_itself_through_others():
    graph = grimp.build_graph(*PACKAGES, include_external_packages=False)
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = grimp.ImportGraph()
    for module in ("a.one", "a.two", "a.three"):
        graph.add_module(module)
    graph.add_import(importer="a.one", imported="a.two")
    graph.add_import(importer="a.two", imported="a.three")
    assert cycles(graph) == []
    graph.add_import(importer="a.three", imported="a.one")
    assert cycles(graph) == [["a.one", "a.three", "a.two"]]


def placing_expressions() -> list[str]:
    """The modules and patterns of .importlinter that give a module its place: a service or model below the entry
    points, an entry point, a migration, one of the project's entry modules (the top layer) or its shared
    infrastructure (under every app)."""
    config = configparser.ConfigParser()
    config.read(settings.BASE_DIR / ".importlinter")

    def listed(contract: str, option: str) -> list[str]:
        lines = config[f"importlinter:contract:{contract}"][option].splitlines()
        return [line.strip() for line in lines if line.strip()]

    project_entry_modules = [name.strip() for name in listed("apps-in-layers", "layers")[0].split(":")]
    return (listed("services-below-entry-points", "source_modules")
            + listed("services-below-entry-points", "forbidden_modules")
            + listed("migrations-import-no-live-code", "source_modules")
            + listed("portal-infrastructure", "source_modules")
            + project_entry_modules)


def unplaced(graph: grimp.ImportGraph, expressions: list[str]) -> list[str]:
    """The modules that no expression names, by itself or as a package around it. A package whose own module imports
    nothing of the project is only a folder: its modules are placed one by one."""
    placed = set()
    for expression in expressions:
        placed |= graph.find_matching_modules(expression) if "*" in expression else {expression}

    def is_placed(module: str) -> bool:
        return any(module == place or module.startswith(place + ".") for place in placed)

    def is_folder(module: str) -> bool:
        return bool(graph.find_children(module)) and not graph.find_modules_directly_imported_by(module)

    return sorted(module for module in graph.modules if not is_placed(module) and not is_folder(module))


def test_every_module_has_a_place_in_the_layers():
    """A new module is a service, an entry point, a migration or a piece of portal, or the contracts do not check it:
    add it (or a pattern that matches it) to the right list in .importlinter."""
    graph = grimp.build_graph(*PACKAGES, include_external_packages=False)
    assert unplaced(graph, placing_expressions()) == []


def test_the_place_finder_finds_a_module_without_one():
    graph = grimp.ImportGraph()
    for module in ("app", "app.services", "app.admin", "app.newcomer", "app.wing", "app.wing.views"):
        graph.add_module(module)
    expressions = ["app.services", "**.admin", "**.views"]
    assert unplaced(graph, expressions) == ["app.newcomer"]
    graph.add_import(importer="app.wing", imported="app.services")
    assert unplaced(graph, expressions) == ["app.newcomer", "app.wing"]


def test_the_import_contracts_hold():
    lint_imports = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint_imports), "--no-cache"], cwd=settings.BASE_DIR, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout, result.stdout
