"""Layer graphs of Boltzmann-family models, from networkx: build, validate, colour.

A node is a layer with attributes ``size`` (positive int), ``units`` (``bernoulli`` |
``gaussian`` | ``softmax``, default bernoulli) and ``visible`` (bool, default False); an edge is a
weight matrix between two layers. An undirected ``nx.Graph`` describes an RBM or a (multimodal)
DBM; a ``nx.DiGraph`` describes a DBN: directed edges point downwards (towards the data) and the
top pair is joined in both directions (the undirected RBM at the top).

Validation happens before anything is built: every layer's depth is its distance from the
nearest visible layer, every layer has an edge, and the graph must be 2-colourable, which rules
out self-loops, edges inside a block and odd cycles that break the layering. The 2-colouring
gives the blocks of block Gibbs: layers of one colour are conditionally independent given the
other. A graph may have several components (each must hold a visible layer); each is coloured
from its first visible layer.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import networkx as nx

UNITS = ("bernoulli", "gaussian", "softmax")


class LayerGraph:
    """A validated layer graph; ``layers`` are ordered by depth (visible layers first).

    ``graph`` is a networkx ``Graph``/``DiGraph``, node-link data (a dict) or the path of a
    node-link ``.json`` file."""

    graph: nx.Graph

    def __init__(self, graph):
        if isinstance(graph, LayerGraph):
            graph = graph.graph
        if isinstance(graph, (str, Path)):
            graph = load_graph(graph).graph
        if isinstance(graph, dict):
            graph = graph_from_json(graph)
        if isinstance(graph, (nx.MultiGraph, nx.MultiDiGraph)) or not isinstance(graph, (nx.Graph, nx.DiGraph)):
            raise TypeError(f"graph: expected a networkx Graph or DiGraph (no multi-edges), got {type(graph).__name__}")
        self.graph = graph
        self.directed = graph.is_directed()
        self._validate()

    # -- validation -------------------------------------------------------------------------
    def _validate(self) -> None:
        g = self.graph
        if g.number_of_nodes() == 0:
            raise ValueError("graph: expected at least two layers, got an empty graph")
        for node, attrs in g.nodes(data=True):
            if not isinstance(node, str) or not node or "." in node:
                raise ValueError(f"graph: layer names must be non-empty strings without '.', got {node!r}")
            size = attrs.get("size")
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"graph: layer {node!r} needs a positive int 'size', got {size!r}")
            units = attrs.get("units", "bernoulli")
            if units not in UNITS:
                raise ValueError(f"graph: layer {node!r} has units {units!r}; expected one of {UNITS}")
            if not isinstance(attrs.get("visible", False), bool):
                raise ValueError(f"graph: layer {node!r} has visible={attrs.get('visible')!r}; expected True/False")
        for u, v in g.edges():
            if u == v:
                raise ValueError(f"graph: self-loop on layer {u!r}; edges join two different layers")
        visible = [n for n, a in g.nodes(data=True) if a.get("visible", False)]
        if not visible:
            raise ValueError("graph: no visible layer; mark the data layer(s) with visible=True")
        und = g.to_undirected(as_view=True) if self.directed else g
        depth = nx.multi_source_dijkstra_path_length(und, visible, weight=None)
        lonely = [n for n in g.nodes if n not in depth]
        if lonely:
            raise ValueError(f"graph: layer(s) {lonely} are not connected to any visible layer")
        isolated = [n for n in g.nodes if und.degree(n) == 0]
        if isolated:
            raise ValueError(f"graph: layer(s) {isolated} have no edge; every layer joins another by a weight matrix")
        colour = {}
        for component in nx.connected_components(und):  # each holds a visible layer (checked above)
            start = next(n for n in visible if n in component)
            colour[start] = 0
            for u, v in nx.bfs_edges(und, start):
                colour[v] = 1 - colour[u]
        for u, v in und.edges():
            if colour[u] == colour[v]:
                raise ValueError(
                    f"graph: edge ({u!r}, {v!r}) joins two layers of the same Gibbs block; the layer graph must "
                    "be bipartite (an edge inside a layer, or a cycle of odd length breaks the layering)"
                )
        self._colour = colour
        self.depth = dict(depth)
        order = {n: i for i, n in enumerate(g.nodes)}
        self.layers = sorted(g.nodes, key=lambda n: (depth[n], order[n]))
        if self.directed:
            self._validate_directed()

    def _validate_directed(self) -> None:
        g, depth = self.graph, self.depth
        pairs = {frozenset((u, v)) for u, v in g.edges() if g.has_edge(v, u)}
        if len(self.visible) != 1:
            raise ValueError(f"graph: a DBN has one visible layer, got {self.visible}")
        if len(pairs) != 1:
            raise ValueError(
                f"graph: a DBN's DiGraph needs exactly one undirected (both-ways) top pair, got "
                f"{[tuple(p) for p in pairs]}"
            )
        top = tuple(sorted(next(iter(pairs)), key=lambda n: depth[n]))
        deepest = max(depth.values())
        if depth[top[1]] != deepest:
            raise ValueError(f"graph: the undirected pair {top} must be the deepest layers (depth {deepest})")
        for u, v in g.edges():
            if frozenset((u, v)) not in pairs and depth[v] != depth[u] - 1:
                raise ValueError(f"graph: directed edge ({u!r} -> {v!r}) must point downwards, towards the data")
        for n in g.nodes:
            if g.to_undirected(as_view=True).degree(n) > 2:
                raise ValueError(f"graph: a DBN is a chain of layers; layer {n!r} has more than two neighbours")
        self.top_pair = top

    # -- queries ----------------------------------------------------------------------------
    def size(self, layer) -> int:
        return self.graph.nodes[layer]["size"]

    def units(self, layer) -> str:
        return self.graph.nodes[layer].get("units", "bernoulli")

    def is_visible(self, layer) -> bool:
        return bool(self.graph.nodes[layer].get("visible", False))

    @property
    def visible(self) -> list:
        return [n for n in self.layers if self.is_visible(n)]

    @property
    def hidden(self) -> list:
        return [n for n in self.layers if not self.is_visible(n)]

    @property
    def edges(self) -> list[tuple]:
        """Each weight matrix once, as ``(shallower, deeper)`` layer pairs."""
        seen, out = set(), []
        for u, v in self.graph.edges():
            a, b = (u, v) if (self.depth[u], self.layers.index(u)) < (self.depth[v], self.layers.index(v)) else (v, u)
            if (a, b) not in seen:
                seen.add((a, b))
                out.append((a, b))
        return sorted(out, key=lambda e: (self.depth[e[0]], self.layers.index(e[0]), self.layers.index(e[1])))

    def colour(self, layer) -> int:
        return self._colour[layer]

    @property
    def blocks(self) -> tuple[list, list]:
        """The two Gibbs blocks (the 2-colouring; colour 0 holds each component's first visible layer)."""
        return ([n for n in self.layers if self.colour(n) == 0], [n for n in self.layers if self.colour(n) == 1])

    @property
    def is_chain(self) -> bool:
        und = self.graph.to_undirected(as_view=True) if self.directed else self.graph
        return len(self.visible) == 1 and all(d <= 2 for _, d in und.degree()) and nx.is_tree(und)

    def to_json(self) -> dict:
        """Node-link data (plain JSON), what a model's ``spec`` stores."""
        return graph_to_json(self.graph)

    def __repr__(self) -> str:
        parts = [
            f"{n}[{self.size(n)}{', ' + self.units(n) if self.units(n) != 'bernoulli' else ''}"
            f"{', visible' if self.is_visible(n) else ''}]"
            for n in self.layers
        ]
        return f"LayerGraph({'DBN' if self.directed else 'undirected'}: {' '.join(parts)}; edges {self.edges})"


# ---------------------------------------------------------------------------------------------
# files


def graph_to_json(graph) -> dict:
    return nx.node_link_data(graph, edges="edges")


def graph_from_json(data: dict):
    if not isinstance(data, dict) or "nodes" not in data:
        raise ValueError("graph: expected networkx node-link data (a dict with 'nodes' and 'edges')")
    return nx.node_link_graph(data, edges="edges" if "edges" in data else "links")


def load_graph(path) -> LayerGraph:
    """A layer graph from a node-link ``.json`` file (``nx.node_link_data``)."""
    path = Path(path)
    if path.suffix != ".json":
        raise ValueError(f"graph file must be networkx node-link .json, got {path.name!r}")
    return LayerGraph(graph_from_json(json.loads(path.read_text())))


# ---------------------------------------------------------------------------------------------
# common shapes


def _check_sizes(sizes, name="sizes"):
    if not isinstance(sizes, (list, tuple)) or len(sizes) < 2:
        raise ValueError(f"{name}: expected a list of at least two layer sizes, got {sizes!r}")
    return list(sizes)


def rbm_graph(visible: int, hidden: int, units: str = "bernoulli") -> LayerGraph:
    """``v -- h``."""
    return dbm_graph([visible, hidden], units=units)


def dbm_graph(sizes, units: str = "bernoulli") -> LayerGraph:
    """A chain ``v -- h1 -- h2 ...``; ``units`` are the visible layer's."""
    sizes = _check_sizes(sizes)
    g = nx.Graph()
    names = ["v"] + [f"h{i}" for i in range(1, len(sizes))]
    for i, (name, size) in enumerate(zip(names, sizes)):
        g.add_node(name, size=size, units=units if i == 0 else "bernoulli", visible=i == 0)
    g.add_edges_from(itertools.pairwise(names))
    return LayerGraph(g)


def dbn_graph(sizes, units: str = "bernoulli") -> LayerGraph:
    """Directed ``h1 -> v``, ``h2 -> h1`` ... under an undirected top pair."""
    sizes = _check_sizes(sizes)
    g = nx.DiGraph()
    names = ["v"] + [f"h{i}" for i in range(1, len(sizes))]
    for i, (name, size) in enumerate(zip(names, sizes)):
        g.add_node(name, size=size, units=units if i == 0 else "bernoulli", visible=i == 0)
    for lower, upper in itertools.pairwise(names):
        g.add_edge(upper, lower)
    g.add_edge(names[-2], names[-1])
    return LayerGraph(g)


def multimodal_graph(sizes_a, sizes_b, top: int, names=("pixels", "label"), units=("bernoulli", "softmax")):
    """Two pathways joined at a shared top layer (Srivastava & Salakhutdinov 2012).

    ``sizes_a = [visible, hidden...]`` and ``sizes_b`` likewise (``[10]`` joins a one-hot label
    straight to the top)."""
    for arg, sizes in (("sizes_a", sizes_a), ("sizes_b", sizes_b)):
        if not isinstance(sizes, (list, tuple)) or not sizes:
            raise ValueError(f"{arg}: expected a non-empty list of layer sizes, got {sizes!r}")
    g = nx.Graph(top="top")
    g.add_node("top", size=top, units="bernoulli", visible=False)
    for name, sizes, u in zip(names, (sizes_a, sizes_b), units):
        chain = [name] + [f"{name}_h{i}" for i in range(1, len(sizes))]
        for i, (layer, size) in enumerate(zip(chain, sizes)):
            g.add_node(layer, size=size, units=u if i == 0 else "bernoulli", visible=i == 0)
        g.add_edges_from(itertools.pairwise(chain))
        g.add_edge(chain[-1], "top")
    return LayerGraph(g)
