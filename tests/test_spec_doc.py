"""SPEC.md states facts the code must keep: its variant and preset tables are checked against the code."""

import re
from pathlib import Path

import vitspec

SPEC = (Path(__file__).resolve().parents[1] / "SPEC.md").read_text()


def _rows(first_cell_pattern: str, text: str = SPEC) -> list[list[str]]:
    return [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if re.match(rf"^\| {first_cell_pattern} \|", line)
    ]


def test_variant_table_matches_the_code():
    rows = _rows(r"(Ti|S|B|L|H)")
    assert [r[0] for r in rows] == list(vitspec.VIT_SIZES)
    for size, width, depth, mlp, heads, count in rows:
        patch = 14 if "/14" in count else 16
        cfg = vitspec.variant(f"{size}/{patch}")
        assert (cfg.width, cfg.depth, cfg.mlp_dim, cfg.num_heads) == tuple(
            map(int, (width, depth, mlp, heads))
        )
        assert vitspec.num_params(cfg) == int(count.split()[0].replace(",", ""))


def test_preset_table_matches_the_code():
    rows = _rows(r"`[a-z-]+`.*?", SPEC.split("Presets for small images")[1].split("## 5.")[0])
    presets = {re.match(r"`([a-z-]+)`", r[0]).group(1): r for r in rows}
    assert set(presets) == set(vitspec.PRESETS)
    for name, (_, image, channels, width, depth, heads, mlp, count) in presets.items():
        cfg = vitspec.variant(name)
        assert (
            cfg.image_size[0],
            cfg.in_channels,
            cfg.width,
            cfg.depth,
            cfg.num_heads,
            cfg.mlp_dim,
        ) == tuple(map(int, (image, channels, width, depth, heads, mlp))), name
        assert vitspec.num_params(cfg) == int(count.replace(",", "")), name


def _expand(pattern: str) -> list[str]:
    """`a/{b,c}/kernel` -> [a/b/kernel, a/c/kernel]; `{i}` stays as written."""
    m = re.search(r"\{([a-z0-9_]+,[a-z0-9_,]+)\}", pattern)
    if not m:
        return [pattern]
    return [
        e for alt in m.group(1).split(",") for e in _expand(pattern[: m.start()] + alt + pattern[m.end() :])
    ]


def _documented_names() -> list[str]:
    section = SPEC.split("## 3. Parameter tree")[1].split("## 4.")[0]
    cells = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    names = []
    for cell in cells:
        first, *rest = re.findall(r"`([^`]+)`", cell)
        owner = first.rsplit("/", 1)[0]
        # "`a/b/kernel`, `/bias`": a name starting with "/" is relative to the first one's owner.
        for name in [first, *(owner + r if r.startswith("/") else r for r in rest)]:
            names += _expand(name.replace("/...", "/"))
    return names


def test_every_parameter_name_is_in_the_parameter_table():
    every_knob = vitspec.variant(
        "Ti/16",
        depth=2,
        num_registers=1,
        pool="map",
        class_token=True,
        qk_norm=True,
        layer_scale=0.1,
        representation_size=8,
        fc_norm=True,
        pre_norm=True,
    )
    # A DeiT cannot pool by MAP nor have fc_norm or pre-logits: its token and second head separately.
    distilled = vitspec.variant("Ti/16", depth=2, distilled=True, num_registers=1, pre_norm=True)
    documented = _documented_names()
    for cfg in (every_knob, distilled):
        for name in vitspec.param_shapes(cfg):
            generic = re.sub(r"blocks/\d+", "blocks/{i}", name)
            owner = generic.rsplit("/", 1)[0]
            assert any(
                d in (generic, owner) or (d.endswith("/") and generic.startswith(d)) for d in documented
            ), f"{generic} is not in SPEC.md's parameter table"


def test_tolerance_table_matches_the_code():
    from parity_tests.tolerances import TOLERANCES

    rows = _rows(r"(float64|float32|bfloat16)", SPEC.split("## 9. Tolerances")[1])
    documented = {
        (dtype, "grad" if quantity == "gradients" else quantity): bound for dtype, quantity, bound, _ in rows
    }
    expected = {
        (dtype, kind): (f"rel {tol['rel']:g}" if "rel" in tol else f"k = {tol['k']:g}")
        for dtype, kinds in TOLERANCES.items()
        for kind, tol in kinds.items()
    }
    assert documented == expected


def test_stochastic_depth_rates_are_specs_formula():
    # SPEC section 6 states the rate of block i as an expression; both backends take cfg.drop_path_rates.
    formula = re.search(r"with rate `([^`]+)` for block `i`", SPEC.replace("\n", " ")).group(1)
    for depth in (2, 3, 12):
        cfg = vitspec.ViTConfig(depth=depth, stochastic_depth=0.3)
        expected = [eval(formula, {"stochastic_depth": 0.3, "i": i, "depth": depth}) for i in range(depth)]
        assert list(cfg.drop_path_rates) == expected
