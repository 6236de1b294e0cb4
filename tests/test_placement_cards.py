"""Model cards: the shipped catalogue, the config estimator (checked against mlx-lm's own model
classes, built lazily so no weights are allocated), precision changes and the TOML format."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from node.placement import (
    ModelCard,
    PlacementError,
    UnknownModelError,
    card_from_config,
    find_card,
    get_card,
    known_card_ids,
    registry,
    requantize,
)
from node.placement.cards import bits_per_weight, card_to_toml, load_card_file

SHIPPED = {
    "Qwen3.6-27B",
    "Qwen3.6-35B-A3B",
    "Qwen3.5-122B-A10B-4bit",
    "tiny-qwen3.5-dense",
    "tiny-qwen3.5-moe",
}


def test_the_catalogue_ships_the_expected_cards() -> None:
    assert set(known_card_ids()) == SHIPPED


@pytest.mark.parametrize(
    ("card_id", "default_k", "max_k"),
    [("Qwen3.6-27B", 2, 8), ("Qwen3.6-35B-A3B", 1, 8)],
)
def test_qwen36_cards_declare_native_mtp_as_designed(
    card_id: str, default_k: int, max_k: int
) -> None:
    card = get_card(card_id)
    assert card.native_mtp is not None
    assert (card.native_mtp.default_k, card.native_mtp.max_k) == (default_k, max_k)
    assert card.native_mtp.head_bytes > 0
    assert card.source_repo == f"Qwen/{card_id}"


def test_qwen36_27b_card_has_the_published_shape() -> None:
    card = get_card("Qwen3.6-27B")
    assert (card.num_layers, card.hidden_size, card.model_type) == (64, 5120, "qwen3_5")
    assert card.layer_types[:4] == ["linear_attention"] * 3 + ["full_attention"]
    assert card.full_attention_layers == 16
    # 4 KV heads x 256 dims x (K and V) x bf16, in each of the 16 full-attention layers
    assert card.kv_bytes_per_token == 16 * 2 * 4 * 256 * 2
    # ~27B parameters in bf16 (text model only, MTP head included)
    assert 26.5e9 < card.bytes / 2 < 27.9e9
    assert card.context_length == 262_144 and card.bits == 16


def test_the_35b_a3b_card_holds_about_35b_parameters() -> None:
    card = get_card("Qwen3.6-35B-A3B")
    assert (card.num_layers, card.hidden_size, card.model_type) == (40, 2048, "qwen3_5_moe")
    assert 34e9 < card.bytes / 2 < 36.5e9


def test_the_122b_card_is_4bit() -> None:
    card = get_card("Qwen3.5-122B-A10B-4bit")
    assert (card.bits, card.group_size, card.num_layers) == (4, 64, 48)
    # 122B weights at ~4.5 bits per weight
    assert 60 * 2**30 < card.bytes < 75 * 2**30


@pytest.mark.parametrize("card_id", sorted(SHIPPED))
def test_every_shipped_card_is_reproduced_from_its_architecture(card_id: str) -> None:
    card = registry()[card_id]
    again = card_from_config(
        {"model_type": card.model_type, **card.architecture},
        card_id=card.id,
        source_repo=card.source_repo,
        bits=card.bits,
        group_size=card.group_size or 64,
        mtp_k=(card.native_mtp.default_k, card.native_mtp.max_k) if card.native_mtp else None,
    )
    # conversions name Hugging Face repos, which the architecture cannot say
    skip = {"notes", "conversions"}
    assert again.model_dump(exclude=skip) == card.model_dump(exclude=skip)


# --- the estimator against mlx-lm's own modules ------------------------------------------------------


def mlx_lm_bytes(config: dict, bits: int | None) -> tuple[list[int], int, int]:
    """Per-layer, embedding and head bytes of mlx-lm's model for ``config``, bf16 (A_log fp32)
    or quantized like mlx_lm.convert. Arrays stay lazy: sizes come from shapes."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map_with_path
    from mlx_lm.models import qwen3_5, qwen3_5_moe
    from mlx_lm.utils import quantize_model

    module = qwen3_5_moe if config["model_type"] == "qwen3_5_moe" else qwen3_5
    model = module.Model(module.ModelArgs.from_dict(config))
    model.update(
        tree_map_with_path(
            lambda path, v: v if path.endswith("A_log") else v.astype(mx.bfloat16),
            model.parameters(),
        )
    )
    if bits is not None:
        model, _ = quantize_model(model, config, group_size=64, bits=bits)

    def nbytes(module_) -> int:
        return sum(v.nbytes for _, v in tree_flatten(module_.parameters()))

    text = model.language_model
    layers = [nbytes(layer) for layer in text.model.layers]
    head = nbytes(text.model.norm) + (nbytes(text.lm_head) if hasattr(text, "lm_head") else 0)
    return layers, nbytes(text.model.embed_tokens), head


@pytest.mark.parametrize(
    ("card_id", "bits"),
    [("Qwen3.6-27B", None), ("Qwen3.6-35B-A3B", None), ("Qwen3.5-122B-A10B-4bit", 4)],
)
def test_estimator_matches_mlx_lm_to_the_byte(card_id: str, bits: int | None) -> None:
    card = registry()[card_id]
    config = {"model_type": card.model_type, **card.architecture}
    layers, embedding, head = mlx_lm_bytes(config, bits)
    assert card.layer_bytes == layers
    assert card.embedding_bytes == embedding
    assert card.head_bytes == head


def test_estimator_refuses_architectures_it_does_not_know() -> None:
    with pytest.raises(ValueError, match="no parameter estimator for model_type 'llama'"):
        card_from_config({"model_type": "llama", "num_hidden_layers": 2}, card_id="x")


# --- other precisions --------------------------------------------------------------------------------


def test_quant_suffix_rederives_a_card() -> None:
    card = get_card("qwen3.6-27b-8bit")  # ids are case-insensitive
    base = get_card("Qwen3.6-27B")
    assert card.id == "Qwen3.6-27B-8bit" and card.bits == 8 and card.group_size == 64
    assert card.kv_bytes_per_token == base.kv_bytes_per_token
    assert card.bytes == pytest.approx(base.bytes * 8.5 / 16, rel=1e-6)
    assert card.native_mtp is not None and card.native_mtp.default_k == 2
    assert any("scaled" in note for note in card.notes)


@pytest.mark.parametrize("bits", [4, 8])
def test_requantize_approximation_is_close_to_the_exact_estimate(bits: int) -> None:
    base = get_card("Qwen3.6-35B-A3B")
    approx = requantize(base, bits)
    exact = card_from_config(
        {"model_type": base.model_type, **base.architecture},
        card_id="exact",
        bits=bits,
        mtp_k=(1, 3),
    )
    # the approximation treats norms and routers as quantized too: well under 1% apart
    assert approx.bytes == pytest.approx(exact.bytes, rel=0.01)
    assert [
        round(b / e, 3) for b, e in zip(approx.layer_bytes, exact.layer_bytes, strict=True)
    ] == [pytest.approx(1.0, abs=0.01)] * base.num_layers


def test_a_card_shipped_quantized_answers_to_its_bare_name_and_other_precisions() -> None:
    shipped = get_card("Qwen3.5-122B-A10B-4bit")
    assert get_card("Qwen3.5-122B-A10B") is shipped
    bf16 = get_card("Qwen3.5-122B-A10B-bf16")
    assert bf16.bits == 16 and bf16.bytes > 3 * shipped.bytes


def test_requantize_round_trips_and_rejects_nonsense() -> None:
    base = get_card("Qwen3.5-122B-A10B-4bit")
    assert requantize(base, 4) is base
    bf16 = requantize(base, 16)
    assert bf16.id == "Qwen3.5-122B-A10B-bf16" and bf16.group_size is None
    assert bf16.bytes == pytest.approx(base.bytes * 16 / 4.5, rel=1e-6)
    with pytest.raises(PlacementError, match="1 bits"):
        requantize(base, 1)
    assert bits_per_weight(4, 64) == 4.5 and bits_per_weight(16, None) == 16


def test_source_repo_finds_a_card_and_unknown_names_list_the_known_ids() -> None:
    assert find_card("Qwen/Qwen3.6-35B-A3B") is get_card("Qwen3.6-35B-A3B")
    assert find_card("nope") is None
    with pytest.raises(UnknownModelError) as exc:
        get_card("Qwen9-1T")
    for card_id in SHIPPED:
        assert card_id in str(exc.value)


# --- the TOML format ---------------------------------------------------------------------------------


def test_toml_round_trip_keeps_every_field(tmp_path) -> None:
    card = get_card("Qwen3.6-27B-4bit")
    path = tmp_path / "card.toml"
    path.write_text(card_to_toml(card, "a comment\nover two lines"))
    text = path.read_text()
    assert text.startswith("# a comment\n# over two lines\n")
    assert "full_attention_interval = 4" in text  # the shorthand, not 64 layer types
    assert load_card_file(path) == card


def test_toml_shorthand_forms(tmp_path) -> None:
    path = tmp_path / "hand.toml"
    path.write_text(
        'id = "hand"\nmodel_type = "llama"\nnum_layers = 3\nhidden_size = 8\n'
        "bytes = 35\nlayer_bytes = 10\nembedding_bytes = 3\nhead_bytes = 2\n"
        "kv_bytes_per_token = 30\nlinear_state_bytes = 0\ncontext_length = 100\nbits = 16\n"
    )
    card = load_card_file(path)
    assert card.layer_bytes == [10, 10, 10]
    assert card.layer_types == ["full_attention"] * 3
    assert card.kv_bytes_per_token_per_layer == 10


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"bytes": 1}, "add up to"),
        ({"layer_bytes": [1, 2]}, "layer_bytes has 2 entries"),
        ({"kv_bytes_per_token": 7}, "does not split evenly"),
        ({"native_mtp": {"default_k": 4, "max_k": 3}}, "default_k 4 is above max_k 3"),
        ({"native_mtp": {"default_k": 2, "max_k": 9}}, "less than or equal to 8"),
    ],
)
def test_inconsistent_cards_are_refused(change: dict, message: str) -> None:
    data = get_card("tiny-qwen3.5-moe").model_dump()  # 2 full-attention layers
    data.update(change)
    with pytest.raises(ValidationError, match=message):
        ModelCard.model_validate(data)


def test_a_broken_card_file_is_named(tmp_path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("id = ")
    with pytest.raises(PlacementError, match=r"broken\.toml"):
        load_card_file(path)
