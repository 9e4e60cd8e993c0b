"""ViTConfig: validation names the field, the value and what is allowed; JSON round-trips; variants."""

import pytest
from hypothesis import given

import vitspec
from parity_tests.strategies import cait_configs, configs
from vitspec import ViTConfig


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            dict(image_size=30, patch_size=4),
            r"image_size=\(30, 30\) is not divisible by patch_size=\(4, 4\): "
            r"image height 30 % patch height 4 = 2",
        ),
        (dict(image_size=(32, 30), patch_size=(4, 4)), r"image width 30 % patch width 4 = 2"),
        (dict(width=100, num_heads=12), r"num_heads=12 does not divide width=100"),
        (
            dict(pool="cls"),
            r"pool='cls': expected one of 'token', 'gap', 'max', 'avgmax', 'sum', 'map', 'none'",
        ),
        (
            dict(posemb="learn"),
            r"posemb='learn': expected one of 'learned', 'sincos2d', 'sinusoidal_1d', 'sinusoidal_2d', "
            r"'none'",
        ),
        (dict(gelu="erf"), r"gelu='erf': expected one of 'exact', 'tanh'"),
        (dict(depth=0), r"depth=0: expected an int >= 1"),
        (dict(width=12.0), r"width=12.0: expected an int >= 1"),
        (dict(num_classes=-1), r"num_classes=-1: expected an int >= 0"),
        (dict(patch_size=(16, 0)), r"patch_size=\(16, 0\): expected a positive int or a pair"),
        (dict(image_size="224"), r"image_size='224': expected a positive int or a pair"),
        (dict(dropout=1.0), r"dropout=1.0: expected a rate in \[0, 1\)"),
        (dict(stochastic_depth=-0.1), r"stochastic_depth=-0.1: expected a rate in \[0, 1\)"),
        (dict(ln_eps=0.0), r"ln_eps=0.0: expected a finite float > 0"),
        (dict(ln_eps=float("inf")), r"ln_eps=inf: expected a finite float > 0"),
        (dict(ln_eps=10**400), r"ln_eps=1000.*: expected a finite float > 0"),
        (dict(layer_scale="1e-5"), r"layer_scale='1e-5': expected None or a float"),
        (dict(representation_size=0), r"representation_size=0: expected an int >= 1"),
        (dict(qkv_bias=1), r"qkv_bias=1: expected True or False"),
        (dict(pool="token", class_token=False), r"pool='token' reads the class token, but class_token=False"),
        (dict(posemb="sincos2d", width=66, num_heads=6), r"posemb='sincos2d' needs width divisible by 4"),
        (
            dict(posemb="sincos2d"),
            r"posemb='sincos2d' is defined on the patch grid only: set posemb_on_cls=False",
        ),
        (dict(talking_heads="yes"), r"talking_heads='yes': expected True or False"),
        (dict(class_attention_depth=-1), r"class_attention_depth=-1: expected an int >= 0"),
        (dict(class_attention_mlp_dim=64), r"class_attention_mlp_dim is set, but class_attention_depth=0"),
        (
            dict(class_attention_depth=2, posemb_on_cls=False, class_attention_mlp_dim=0),
            r"class_attention_mlp_dim=0: expected an int >= 1",
        ),
        (
            dict(drop_path_schedule="cosine"),
            r"drop_path_schedule='cosine': expected one of 'linear', 'constant'",
        ),
        (
            dict(class_attention_depth=2, posemb_on_cls=True),
            r"^class_attention_depth=2 \(CaiT\): posemb_on_cls must be False \(the posemb is over the "
            r"patches\)$",
        ),
    ],
)
def test_bad_values_name_the_field_and_what_is_allowed(fields, message):
    with pytest.raises(ValueError, match=message):
        ViTConfig(**fields)


def test_a_cait_puts_no_position_embedding_on_its_class_token_by_default():
    assert not ViTConfig(class_attention_depth=2).posemb_on_cls and ViTConfig().posemb_on_cls


def test_a_cait_config_lists_every_conflict_at_once():
    with pytest.raises(ValueError) as e:
        ViTConfig(
            class_attention_depth=1,
            posemb_on_cls=True,
            pool="gap",
            num_registers=1,
            fc_norm=True,
            qk_norm=True,
            representation_size=8,
        )
    assert str(e.value) == (
        "class_attention_depth=1 (CaiT): pool must be 'token'; class_token must be True; "
        "num_registers must be 0; posemb_on_cls must be False (the posemb is over the patches); "
        "fc_norm must be False; qk_norm must be False; representation_size must be None"
    )


def test_cait_tokens_are_patches_and_class_blocks_default_to_the_mlp_width():
    cfg = ViTConfig(image_size=32, patch_size=8, class_attention_depth=2, posemb_on_cls=False, mlp_dim=64)
    assert (cfg.num_prefix_tokens, cfg.num_tokens, cfg.posemb_length) == (0, 16, 16)
    assert cfg.class_attention_mlp_dim == 64
    assert (
        ViTConfig(depth=4, stochastic_depth=0.2, drop_path_schedule="constant").drop_path_rates == (0.2,) * 4
    )


@given(configs())
def test_json_round_trip(cfg):
    assert ViTConfig.from_json(cfg.to_json()) == cfg


@given(cait_configs())
def test_cait_json_round_trip(cfg):
    assert ViTConfig.from_json(cfg.to_json()) == cfg


def test_bad_json_is_named():
    with pytest.raises(ValueError, match=r"unknown ViTConfig field\(s\) \['hidden_size'\]"):
        ViTConfig.from_dict({"hidden_size": 768})
    with pytest.raises(ValueError, match="not valid JSON"):
        ViTConfig.from_json("{width: 3")
    with pytest.raises(ValueError, match="must be an object"):
        ViTConfig.from_json("[1, 2]")


def test_class_token_follows_pool_unless_given():
    assert ViTConfig(pool="token").class_token is True
    assert ViTConfig(pool="gap").class_token is False
    assert ViTConfig(pool="gap", class_token=True).num_prefix_tokens == 1


# Parameter counts of timm's vit_{tiny,small,base,large}_patch16_224 (1000 classes, class token
# with position embedding): published figures, independent of this code.
@pytest.mark.parametrize(
    ("name", "count"),
    [("Ti/16", 5_717_416), ("S/16", 22_050_664), ("B/16", 86_567_656), ("L/16", 304_326_632)],
)
def test_paper_variants_have_the_published_parameter_counts(name, count):
    assert vitspec.num_params(vitspec.variant(name)) == count


def test_variant_overrides_and_rectangular_patches():
    cfg = vitspec.variant("B/16", num_classes=10, image_size=384)
    assert (cfg.width, cfg.depth, cfg.num_heads, cfg.mlp_dim) == (768, 12, 12, 3072)
    assert cfg.grid_size == (24, 24) and cfg.num_classes == 10
    assert vitspec.variant("S/8").patch_size == (8, 8)
    assert vitspec.variant("Ti/16", image_size=(224, 160), patch_size=(16, 8)).grid_size == (14, 20)


def test_cifar_notebook_preset_is_the_notebook_model():
    cfg = vitspec.variant("cifar-notebook")
    assert (cfg.image_size, cfg.patch_size, cfg.depth, cfg.width, cfg.num_heads, cfg.mlp_dim, cfg.pool) == (
        (32, 32),
        (4, 4),
        6,
        128,
        8,
        256,
        "token",
    )
    assert vitspec.variant("fmnist-tiny").in_channels == 1


def test_unknown_variant_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown variant 'X/16'.*'B/16'.*cifar-notebook"):
        vitspec.variant("X/16")
