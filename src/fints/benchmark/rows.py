"""The rows a run takes to its test queries: baselines, the chosen Fints, its design
variants and the controls, as the preset (or ``--rows``) asks."""

from __future__ import annotations

from collections.abc import Sequence

from fints.benchmark.labels import (
    DEFAULT_COMPONENT,
    EXTRA_USER_VECTORS,
    REFERENCE_ICL_K,
    STEERING_KINDS,
    USER_VECTORS,
    Kind,
    Label,
    Role,
    Source,
)
from fints.benchmark.methods import MethodSpec
from fints.benchmark.presets import Preset
from fints.benchmark.runner import deduplicated
from fints.benchmark.search import Selection
from fints.errors import InvalidInputError
from fints.extraction import method_config
from fints.sites import Component, parse_sites
from fints.steering import SteeringConfig

#: The site variants of the chosen setting, in the order the report lists them.
VARIANT_COMPONENTS: tuple[str, ...] = (
    Component.ATTN,
    Component.MLP,
    DEFAULT_COMPONENT,
    Component.BLOCK,
)


def methods_for_test(
    best: MethodSpec, absolute: MethodSpec | None, contrasts: Sequence[str], *, unique: bool = True
) -> list[MethodSpec]:
    """Baselines, the chosen Fints, its design variants and the controls.

    A variant can coincide with the chosen setting (``fints attn`` when ``attn`` was
    chosen); with ``unique`` only the first spec of each configuration is kept.
    """
    layer = parse_sites(best.sites)[0].layer
    icl = max(best.icl_k, REFERENCE_ICL_K)
    specs = [
        MethodSpec(Label.NONE, role=Role.BASELINE),
        *(
            MethodSpec(Label.icl(k), kind=Kind.ICL, icl_k=k, role=Role.BASELINE)
            for k in (1, REFERENCE_ICL_K)
        ),
        best.with_(label=Label.BEST, role=Role.FINTS),
    ]
    for uv in USER_VECTORS:
        specs.append(
            best.with_(
                label=Label.user_vector(uv), kind=Kind.VECTOR, user_vector=uv, role=Role.BASELINE
            )
        )
    variant = Role.VARIANT
    for comp in VARIANT_COMPONENTS:
        specs.append(best.with_(label=Label.fints_at(comp), sites=f"{layer}.{comp}", role=variant))
    flip = "mean" if best.aggregation == "attentive" else "attentive"
    specs.append(best.with_(label=Label.fints_aggregation(flip), aggregation=flip, role=variant))
    if best.icl_k:
        specs.append(best.with_(label=Label.WITHOUT_ICL, icl_k=0, role=variant))
    else:
        k = REFERENCE_ICL_K
        specs.append(best.with_(label=Label.fints_plus_icl(k), icl_k=k, role=variant))
    for c in contrasts:
        specs.append(best.with_(label=Label.fints_contrast(c), contrast=c, role=variant))
    if best.relative and absolute is not None:
        specs.append(absolute.with_(label=Label.ABSOLUTE_STRENGTH, role=variant))
    elif not best.relative:
        specs.append(
            best.with_(label=Label.RELATIVE_STRENGTH, relative=True, strength=0.15, role=variant)
        )
    if not best.centered:
        # Without the direction every user shares: is the user's own dictionary still
        # better than another user's (report.PROBES)?
        centered = best.with_(label=Label.CENTERED, centered=True, role=variant)
        specs += [
            centered,
            centered.with_(label=Label.CENTERED_WRONG_USER, vector_source=Source.WRONG),
        ]
    control = Role.CONTROL
    specs += [
        best.with_(label=Label.RANDOM_DIRECTION, vector_source=Source.RANDOM, role=control),
        best.with_(label=Label.WRONG_USER_DICTIONARY, vector_source=Source.WRONG, role=control),
    ]
    specs += [
        MethodSpec(
            Label.wrong_user_icl(k),
            kind=Kind.ICL,
            icl_k=k,
            icl_source=Source.WRONG,
            role=control,
        )
        for k in sorted({1, icl})
    ]
    if best.icl_k:
        specs.append(
            best.with_(label=Label.FINTS_ON_WRONG_USER_ICL, icl_source=Source.WRONG, role=control)
        )
    return deduplicated(specs) if unique else specs


def default_method_rows(methods: Sequence[str], num_layers: int) -> list[MethodSpec]:
    """Each extraction method as a new user gets it: its own default sites, the product's
    default steering (:class:`SteeringConfig`), nothing searched; with its controls
    (another user's vectors, the other users' mean, a random direction of the same norm)."""
    steering = SteeringConfig()
    specs: list[MethodSpec] = []
    for name in methods:
        sites = method_config(name).default_sites(num_layers)
        own = MethodSpec(
            Label.method_defaults(name),
            kind=Kind.FINTS,
            sites=",".join(str(s) for s in sites),
            strength=steering.strength(sites[0]),
            relative=steering.relative,
            top_k=steering.top_k,
            aggregation=steering.aggregation,
            tau=steering.tau,
            contrast=name,
            role=Role.DEFAULTS,
        )
        specs += [
            own,
            own.with_(label=Label.method_wrong_user(name), vector_source=Source.WRONG),
            own.with_(label=Label.method_others(name), vector_source=Source.OTHERS),
            own.with_(label=Label.method_random(name), vector_source=Source.RANDOM),
        ]
    return specs


def rows_for_test(
    selection: Selection,
    preset: Preset,
    rows: Sequence[str] | None,
    fixed: Sequence[MethodSpec] = (),
) -> list[MethodSpec]:
    """The rows run on test: the preset's choice, or exactly the labels in ``rows``;
    ``fixed`` rows (:func:`default_method_rows`) come last, whatever the preset filters.

    A named variant that coincides with the chosen setting (``fints response
    contrast`` when the response contrast was chosen) is run once, as the first
    label naming it.
    """
    every = methods_for_test(
        selection.best, selection.best_absolute, preset.contrasts, unique=False
    )
    if rows is not None:
        every += fixed
        known = list(dict.fromkeys(s.label for s in every))
        unknown = [r for r in rows if r not in known]
        if unknown:
            raise InvalidInputError(f"unknown row(s) {unknown}: expected some of {known}")
        return deduplicated([s for s in every if s.label in rows])
    specs = deduplicated(every)
    if not preset.variants:
        specs = [s for s in specs if s.role != Role.VARIANT]
    if preset.baselines is not None:
        keep = preset.baselines
        specs = [s for s in specs if s.role != Role.BASELINE or s.label in keep]
    if not preset.extra_baselines:
        extra = {Label.user_vector(uv) for uv in EXTRA_USER_VECTORS}
        specs = [s for s in specs if s.label not in extra]
    own_icl = {s.icl_k for s in specs if s.kind == Kind.ICL and s.icl_source == Source.OWN}
    # a wrong-user ICL control runs only beside the own-items ICL row it controls
    kept = [
        s for s in specs if s.kind != Kind.ICL or s.icl_source == Source.OWN or s.icl_k in own_icl
    ]
    return deduplicated([*kept, *fixed])


def steers(specs: Sequence[MethodSpec]) -> bool:
    """Whether any row steers with searched settings (and so needs the validation
    search): rows at a method's own defaults do not."""
    return any(s.kind in STEERING_KINDS and s.role != Role.DEFAULTS for s in specs)
