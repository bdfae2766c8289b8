import itertools
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
    g.add_edges_from(itertools.pairwise(names))
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
    with pytest.raises(ValueError, match=r"node-link \.json"):
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


def two_rbms():
    g = nx.Graph()
    for name, size, visible in [("v1", 5, True), ("h1", 3, False), ("v2", 4, True), ("h2", 2, False)]:
        g.add_node(name, size=size, visible=visible)
    g.add_edges_from([("v1", "h1"), ("v2", "h2")])
    return g


def test_components_that_each_hold_a_visible_layer_are_coloured_one_by_one():
    g = LayerGraph(two_rbms())
    assert g.blocks == (["v1", "v2"], ["h1", "h2"])
    assert all(g.colour(a) != g.colour(b) for a, b in g.edges)


def test_a_dbm_of_two_components_is_the_product_of_their_models():
    """log p(v1, v2) of two unconnected RBMs is log p(v1) + log p(v2), each by exact enumeration."""
    import torch

    from ppdgm.models.dbm import DBM

    torch.manual_seed(0)
    both = DBM(graph=two_rbms(), init_scale=0.5)
    parts = [DBM(sizes=[5, 3], init_scale=0.5), DBM(sizes=[4, 2], init_scale=0.5)]
    layers = {name: i for i, name in enumerate(both.layers)}
    for part, (v, h) in zip(parts, [("v1", "h1"), ("v2", "h2")]):
        part.weights[0].data.copy_(both.weights[both.edge_index.index((layers[v], layers[h]))])
        part.biases[0].data.copy_(both.biases[layers[v]])
        part.biases[1].data.copy_(both.biases[layers[h]])
    x1, x2 = torch.bernoulli(torch.full((6, 5), 0.5)), torch.bernoulli(torch.full((6, 4), 0.5))
    joint = both.log_likelihood((x1, x2), method="exact")
    separate = parts[0].log_likelihood(x1, method="exact") + parts[1].log_likelihood(x2, method="exact")
    assert torch.allclose(joint, separate, atol=1e-4)


def test_a_layer_without_edges_is_refused_before_building():
    g = two_rbms()
    g.add_node("v3", size=2, visible=True)  # a visible layer beside connected pairs
    with pytest.raises(ValueError, match=r"\['v3'\] have no edge"):
        LayerGraph(g)
    lone = nx.Graph()
    lone.add_node("v", size=3, visible=True)
    with pytest.raises(ValueError, match="no edge"):
        LayerGraph(lone)


@st.composite
def layer_graph_specs(draw):
    """Any small spec: layer sizes (some invalid), units (some unknown), visible flags, any edges."""
    n = draw(st.integers(1, 6))
    directed = draw(st.booleans())
    g = nx.DiGraph() if directed else nx.Graph()
    for i in range(n):
        g.add_node(
            f"l{i}",
            size=draw(st.sampled_from([1, 2, 3, 5, 0, -1])),
            units=draw(st.sampled_from(["bernoulli", "bernoulli", "gaussian", "softmax", "relu"])),
            visible=draw(st.booleans()),
        )
    pairs = [(f"l{i}", f"l{j}") for i in range(n) for j in range(n)]
    g.add_edges_from(draw(st.lists(st.sampled_from(pairs), max_size=8)))
    return g


@settings(max_examples=200, deadline=None)
@given(g=layer_graph_specs())
def test_every_layer_graph_spec_builds_properly_coloured_or_raises_value_error(g):
    try:
        lg = LayerGraph(g)
    except ValueError as e:
        assert str(e).startswith("graph: ")
        return
    und = g.to_undirected(as_view=True) if g.is_directed() else g
    assert all(lg.colour(a) != lg.colour(b) for a, b in und.edges())  # a proper 2-colouring
    for component in nx.connected_components(und):
        assert any(lg.is_visible(n) for n in component)
        assert {lg.colour(n) for n in component} == {0, 1}
    assert sorted(lg.layers) == sorted(g.nodes) and set(lg.blocks[0]) | set(lg.blocks[1]) == set(g.nodes)
    from ppdgm.models.dbm import DBM
    from ppdgm.models.dbn import DBN

    try:  # the model on a valid graph builds too, or names what it cannot take
        model = DBN(graph=g) if g.is_directed() else DBM(graph=g)
    except ValueError as e:
        assert str(e).startswith("graph: ")
        return
    assert model.spec["kwargs"]["graph"] == nx.node_link_data(g, edges="edges")
