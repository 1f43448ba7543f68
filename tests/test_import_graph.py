"""The packages import one way (sweeps -> eval -> trainables) and no module imports itself back through others;
`python tests/import_graph.py` prints the graph this checks."""

from import_graph import cycles, import_graph, layer_violations


def test_no_module_imports_itself_back():
    assert cycles(import_graph()) == []


def test_the_layers_point_one_way():
    graph = import_graph()
    assert layer_violations(graph) == []
    assert not any(target.startswith("sweeps.") for source, targets in graph.items() if source.startswith("eval.")
                   for target in targets)


def test_the_checks_see_a_cycle_and_a_layer_violation():
    """The two checks above are only worth something if they catch what they look for."""
    graph = {"sweeps.a": {"eval.b"}, "eval.b": {"sweeps.a"}}
    assert cycles(graph) == [["eval.b", "sweeps.a", "eval.b"]]
    assert layer_violations(graph) == ["eval.b -> sweeps.a"]
    # Imports inside functions count too: the driver imports the Tuner only once its quick checks passed.
    assert "sweeps.tuner" in import_graph()["sweeps.lora_search"]
