"""Extra-network tags, per A1111 modules/extra_networks.py and the built-in Lora extension (v1.10.1)."""

import pytest

from sdstack.errors import UserError
from sdstack.prompts.extra_networks import (
    ExtraNetworkCall,
    format_lora_hashes,
    lora_dyn_dim,
    lora_weights,
    parse_extra_networks,
)


def test_a1111_docstring_example():
    # ExtraNetwork.activate's docstring: "1girl, <hypernet:agm:1.1> <extrasupernet:master:12:13:14> <hypernet:ray>"
    text, calls = parse_extra_networks("1girl, <hypernet:agm:1.1> <extrasupernet:master:12:13:14> <hypernet:ray>")
    assert text == "1girl,   "
    assert [(c.kind, c.items) for c in calls] == [
        ("hypernet", ("agm", "1.1")),
        ("extrasupernet", ("master", "12", "13", "14")),
        ("hypernet", ("ray",)),
    ]


def test_tags_are_removed_and_other_text_kept():
    text, calls = parse_extra_networks("a <lora:add_detail:0.8> (cat:1.2), <b> <lora:> x")
    assert text == "a  (cat:1.2), <b> <lora:> x"  # <b> has no ":" and <lora:> no argument: not tags
    assert calls == [ExtraNetworkCall("lora", ("add_detail", "0.8"))]


def test_named_and_positional_arguments():
    call = parse_extra_networks("<lora:name:te=0.5:unet=0.25:a=b=c>")[1][0]
    assert call.positional == ("name", "a=b=c")  # "a=b=c" splits in three: positional, as in A1111
    assert call.named == {"te": "0.5", "unet": "0.25"}
    assert call.name == "name"
    assert str(call) == "<lora:name:te=0.5:unet=0.25:a=b=c>"


@pytest.mark.parametrize(
    "tag, expected",
    [
        ("<lora:detail>", ("detail", 1.0, 1.0)),
        ("<lora:detail:0.6>", ("detail", 0.6, 0.6)),  # unet defaults to te
        ("<lora:detail:0.6:0.3>", ("detail", 0.6, 0.3)),
        ("<lora:detail:te=0.2>", ("detail", 0.2, 0.2)),
        ("<lora:detail:0.6:unet=0.1>", ("detail", 0.6, 0.1)),
        ("<lora:detail:0.6:0.3:te=0.9>", ("detail", 0.9, 0.3)),  # named wins over positional
        ("<lyco:detail:-1>", ("detail", -1.0, -1.0)),
        ("<lora:my lora v2:1.5>", ("my lora v2", 1.5, 1.5)),
    ],
)
def test_lora_weights(tag, expected):
    assert lora_weights(parse_extra_networks(tag)[1][0]) == expected


def test_lora_dyn_dim():
    assert lora_dyn_dim(parse_extra_networks("<lora:x:1:1:8>")[1][0]) == 8
    assert lora_dyn_dim(parse_extra_networks("<lora:x:dyn=16>")[1][0]) == 16
    assert lora_dyn_dim(parse_extra_networks("<lora:x:1>")[1][0]) is None


def test_lora_bad_weight_is_a_user_error():
    with pytest.raises(UserError, match="abc"):
        lora_weights(parse_extra_networks("<lora:x:abc>")[1][0])
    with pytest.raises(UserError, match="names no LoRA"):
        lora_weights(parse_extra_networks("<lora:te=1>")[1][0])


def test_lora_weights_rejects_other_kinds():
    with pytest.raises(ValueError):
        lora_weights(ExtraNetworkCall("hypernet", ("x", "1")))


def test_format_lora_hashes_matches_infotext_examples():
    assert format_lora_hashes({"add_detail": "7c6bad76eb54", "foo": "0123456789ab"}) == (
        "add_detail: 7c6bad76eb54, foo: 0123456789ab"
    )
    assert format_lora_hashes({"a:b,c": "1234"}) == "abc: 1234"
