import json

import networkx as nx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ppdgm.graphs import LayerGraph, dbm_graph, dbn_graph, load_graph, multimodal_graph, rbm_graph


def chain(sizes):
    g = nx.Graph()
    names = [f"l{i}" for i in range(len(sizes))]
    for i, (n, s) in enumerate(zip(names, sizes)):
        g.add_node(n, size=s, visible=i == 0)
    g.add_edges_from(zip(names, names[1:]))
    return g


def test_helpers_build_layered_graphs_with_two_gibbs_blocks():
    g = dbm_graph([64, 32, 16, 8])
    assert g.layers == ["v", "h1", "h2", "h3"]
    assert g.blocks == (["v", "h2"], ["h1", "h3"])
    assert g.edges == [("v", "h1"), ("h1", "h2"), ("h2", "h3")]
    assert g.is_chain and rbm_graph(5, 3).is_chain
    m = multimodal_graph([64, 128], [10], 32)
    assert m.visible == ["pixels", "label"] and m.units("label") == "softmax"
    # every edge joins the two blocks
    assert all(m.colour(a) != m.colour(b) for a, b in m.edges)
    d = dbn_graph([64, 32, 16])
    assert d.directed and d.top_pair == ("h1", "h2")


def test_json_round_trip(tmp_path):
    m = multimodal_graph([64, 128], [10], 32)
    path = tmp_path / "g.json"
    path.write_text(json.dumps(m.to_json()))
    back = load_graph(path)
    assert back.layers == m.layers and back.edges == m.edges and back.graph.graph["top"] == "top"
    assert LayerGraph(m.to_json()).visible == m.visible
    assert LayerGraph(str(path)).edges == m.edges
    with pytest.raises(ValueError, match="node-link .json"):
        load_graph(tmp_path / "g.edgelist")


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda g: g.nodes["l1"].pop("size"), "'l1' needs a positive int 'size'"),
        (lambda g: g.nodes["l1"].update(size=0), "'l1' needs a positive int 'size'"),
        (lambda g: g.nodes["l1"].update(size=2.5), "'l1' needs a positive int 'size'"),
        (lambda g: g.nodes["l2"].update(units="poisson"), "'l2' has units 'poisson'"),
        (lambda g: g.add_edge("l1", "l1"), "self-loop on layer 'l1'"),
        (lambda g: g.nodes["l0"].update(visible=False), "no visible layer"),
        (lambda g: g.add_node("lonely", size=3), r"\['lonely'\] are not connected"),
        (lambda g: g.add_edge("l0", "l2"), r"edge \('l\d', 'l\d'\) joins two layers of the same Gibbs block"),
    ],
)
def test_bad_graphs_name_the_layer_or_edge(corrupt, match):
    g = chain([6, 4, 3])
    corrupt(g)
    with pytest.raises(ValueError, match=match):
        LayerGraph(g)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 50), min_size=2, max_size=6),
    kind=st.sampled_from(["size", "units", "selfloop", "novisible", "isolated", "odd_cycle"]),
    where=st.integers(0, 100),
)
def test_any_corrupted_chain_is_refused_before_building(sizes, kind, where):
    g = chain(sizes)
    names = list(g.nodes)
    node = names[where % len(names)]
    if kind == "size":
        g.nodes[node]["size"] = -where
    elif kind == "units":
        g.nodes[node]["units"] = "relu"
    elif kind == "selfloop":
        g.add_edge(node, node)
    elif kind == "novisible":
        g.nodes["l0"]["visible"] = False
    elif kind == "isolated":
        g.add_node("extra", size=2)
    else:
        if len(names) < 3:
            g.add_node("x", size=2)
            g.add_edges_from([("l0", "x"), ("l1", "x")])
        else:
            g.add_edge(names[0], names[2])
    with pytest.raises(ValueError, match="graph: "):
        LayerGraph(g)


def test_wrong_types_and_dbn_structure():
    with pytest.raises(TypeError, match="networkx Graph or DiGraph"):
        LayerGraph([[64, 32]])
    with pytest.raises(TypeError, match="no multi-edges"):
        LayerGraph(nx.MultiGraph(chain([3, 2])))
    with pytest.raises(ValueError, match="layer names must be non-empty strings"):
        LayerGraph(nx.relabel_nodes(chain([3, 2]), {"l1": 7}))
    d = nx.DiGraph(chain([4, 3, 2]))  # every edge both ways: two undirected pairs
    with pytest.raises(ValueError, match="exactly one undirected"):
        LayerGraph(d)
    up = nx.DiGraph()
    up.add_node("v", size=4, visible=True)
    up.add_node("h1", size=3)
    up.add_node("h2", size=2)
    up.add_edges_from([("v", "h1"), ("h1", "h2"), ("h2", "h1")])
    with pytest.raises(ValueError, match="must point downwards"):
        LayerGraph(up)
    with pytest.raises(ValueError, match="at least two layer sizes"):
        dbm_graph([5])
