"""``spec`` is the outermost constructor call's arguments as plain data (ppdgm/models/spec.py)."""

import networkx as nx
import pytest
import torch

from ppdgm.graphs import dbm_graph
from ppdgm.models.dbm import DBM, MultimodalDBM
from ppdgm.models.spec import ConstructorSpec, plain_data
from ppdgm.models.vae import VAE


def test_spec_records_the_outermost_call_with_defaults_as_plain_data():
    vae = VAE(features=6, hidden_features=(5, 4))
    assert vae.spec["name"] == "vae"
    assert vae.spec["kwargs"]["hidden_features"] == [5, 4] and vae.spec["kwargs"]["latent_features"] == 16
    mm = MultimodalDBM(features=5, hidden_units=4, top_units=3, classes=2)  # its __init__ calls DBM.__init__
    assert mm.spec == {
        "name": "mdbm",
        "kwargs": {
            "graph": None,
            "features": 5,
            "hidden_units": 4,
            "top_units": 3,
            "classes": 2,
            "init_scale": 0.01,
            "mean_field_steps": 10,
            "pretrain_epochs": 30,
            "positive_phase": "gibbs",
            "positive_sweeps": 1,
        },
    }


def test_a_graph_argument_becomes_node_link_data_that_rebuilds_an_equal_graph():
    g = dbm_graph([5, 3, 2])
    for given in (g, g.graph):
        spec = DBM(graph=given).spec
        again = DBM(**spec["kwargs"]).layer_graph.graph
        assert nx.utils.graphs_equal(again, g.graph)


def test_what_a_spec_cannot_hold_is_refused_naming_the_argument():
    with pytest.raises(TypeError, match=r"hidden_features\[1\]: .* got Tensor"):
        VAE(features=6, hidden_features=[4, torch.tensor(3)])
    with pytest.raises(TypeError, match=r"value: .* got object"):
        plain_data(object())
    with pytest.raises(TypeError, match=r"takes \*kw; a spec needs named"):
        type("Loose", (ConstructorSpec,), {"__init__": lambda self, **kw: None})


def test_an_unregistered_subclass_has_no_spec_rather_than_its_parent_s():
    class MyVAE(VAE):
        pass

    assert not hasattr(MyVAE(features=4, hidden_features=[3]), "spec")
