import pytest
import torch

from fints.errors import InvalidInputError, UnsupportedModelError
from fints.layers import LayerPaths, resolve_layout
from fints.sites import Component, Site, check_layers_in_range, parse_sites


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("3.attn+mlp", (Site(3, Component.ATTN), Site(3, Component.MLP))),
        ("2.block, 1:attn", (Site(1, Component.ATTN), Site(2, Component.BLOCK))),
        ("1.mlp,1.mlp+attn", (Site(1, Component.ATTN), Site(1, Component.MLP))),
        (["2.mlp", Site(0, Component.BLOCK)], (Site(0, Component.BLOCK), Site(2, Component.MLP))),
    ],
)
def test_parse_sites_forms_are_sorted_without_duplicates(spec, expected):
    assert parse_sites(spec) == expected


def test_a_site_prints_as_it_parses():
    assert str(Site.parse("12.mlp")) == "12.mlp"


@pytest.mark.parametrize("bad", ["attn", "x.attn", "3.ffn", ""])
def test_parse_sites_rejects(bad):
    with pytest.raises(InvalidInputError):
        parse_sites(bad)


def test_out_of_range_layer_is_named():
    with pytest.raises(InvalidInputError, match=r"site 30.attn is out of range.*30 layers"):
        check_layers_in_range(parse_sites("30.attn"), 30)


def test_every_architecture_resolves_to_real_submodules(arch_model):
    layout = resolve_layout(arch_model)
    assert layout.num_layers == 3
    for i in range(3):
        attn, mlp, block = (layout.module(Site(i, c)) for c in Component)
        # the attention and MLP blocks really are children of that decoder layer
        children = list(block.children())
        assert attn in children and mlp in children and attn is not mlp


@pytest.mark.parametrize("component", list(Component))
def test_hooks_see_outputs_that_feed_the_residual(arch_model, component):
    """Adding to attn/mlp/block changes the logits: the hooks sit on the live path."""
    layout = resolve_layout(arch_model)
    ids = torch.tensor([[1, 5, 7, 9]])
    base = arch_model(ids).logits
    handle = layout.module(Site(1, component)).register_forward_hook(
        lambda _m, _i, o: (o[0] + 1.0, *o[1:]) if isinstance(o, tuple) else o + 1.0
    )
    try:
        assert not torch.allclose(arch_model(ids).logits, base)
    finally:
        handle.remove()


def test_unsupported_model_error_says_how_to_name_modules():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(UnsupportedModelError, match="LayerPaths"):
        resolve_layout(model)


def test_custom_layer_paths_resolve(arch_model):
    if arch_model.config.model_type == "gpt2":
        paths = LayerPaths("transformer.h", "attn", "mlp")
    else:
        paths = LayerPaths("model.layers", "self_attn", "mlp")
    assert resolve_layout(arch_model, paths).num_layers == 3


def test_custom_layer_paths_that_do_not_exist_are_named(arch_model):
    with pytest.raises(UnsupportedModelError, match="could not resolve"):
        resolve_layout(arch_model, LayerPaths("model.nothing", "a", "b"))
