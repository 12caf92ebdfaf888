"""The package's import graph has no cycle: no module imports one that imports it back, even through
function-level imports (grimp sees those too), so the layers in `.importlinter` mean what they say."""

from __future__ import annotations

import grimp


def test_no_module_imports_one_that_imports_it_back() -> None:
    graph = grimp.build_graph("dnnprune")
    cycles = [(module, imported) for module in sorted(graph.modules)
              for imported in graph.find_modules_directly_imported_by(module)
              if graph.chain_exists(importer=imported, imported=module)]
    assert cycles == []


def test_the_codecs_sit_below_the_checkpoint_and_import_nothing_above_them() -> None:
    graph = grimp.build_graph("dnnprune")
    assert graph.chain_exists(importer="dnnprune.checkpoint", imported="dnnprune.codecs")
    above = {m for m in graph.find_upstream_modules("dnnprune.codecs", as_package=True) if m.startswith("dnnprune")}
    assert above <= {"dnnprune.errors"} | {m for m in graph.modules if m.startswith("dnnprune.codecs")}
