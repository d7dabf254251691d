"""One parameter system (`Param` + `validate_params`), one `Registry` and one `Paper` type serve the
variants, the KV presses and the head probes alike."""
from __future__ import annotations

import pytest

import attnzoo as az
import attnzoo.kv as kv
from attnzoo.core import registry
from attnzoo.core.info import Paper, Param, positive_int, validate_params
from attnzoo.core.registry import Registry
from attnzoo.heads.probes import PROBES, REGISTRY as PROBE_REGISTRY, get_probe

PRESSES = kv.methods()
PROBE_CLASSES = list(PROBES.values())


def _ids(classes):
    return [c.name for c in classes]


# ---- misspelled names: TypeError with a did-you-mean ---------------------------------------------


@pytest.mark.parametrize("make, match", [
    (lambda: kv.get("snapkv", windw=32), r"snapkv: unknown parameter\(s\) \['windw'\] \(did you mean 'window'\?\); "
                                         r"valid parameters: \['kernel', 'ratio', 'window'\]"),
    (lambda: kv.get("streaming_llm", ratio=0.5, sink=2), r"streaming_llm: .*\['sink'\] \(did you mean 'sinks'\?\)"),
    (lambda: kv.get("knorm", ration=0.5), r"knorm: unknown parameter\(s\) \['ration'\] \(did you mean 'ratio'\?\)"),
    (lambda: kv.get("kv_quant", bit=4), r"kv_quant: .*\['bit'\] \(did you mean 'bits'\?\)"),
    (lambda: get_probe("active_dormant", dormat=0.5), r"active_dormant: .*\['dormat'\] \(did you mean 'dormant'\?\)"),
    (lambda: get_probe("retrieval", top=3), r"retrieval: unknown parameter\(s\) \['top'\]; valid parameters: none"),
    (lambda: az.get("sliding_window", windw=8), r"sliding_window: .*\['windw'\] \(did you mean 'window'\?\)"),
])
def test_a_misspelled_parameter_is_a_type_error_naming_the_closest_one(make, match):
    with pytest.raises(TypeError, match=match):
        make()


# ---- bad values: ValueError naming the parameter and what it takes; wrong types: TypeError -----------


@pytest.mark.parametrize("make, match", [
    (lambda: kv.get("streaming_llm", sinks=-1), r"streaming_llm: parameter 'sinks' must be a non-negative int, got -1"),
    (lambda: kv.get("h2o", recent_share=1.5), r"h2o: parameter 'recent_share' must be a number in \[0, 1\], got 1\.5"),
    (lambda: kv.get("snapkv", window=0), r"snapkv: parameter 'window' must be a positive int, got 0"),
    (lambda: kv.get("promptdistill", select_layer=1.0), r"'select_layer' must be a number in \[0, 1\), got 1\.0"),
    (lambda: kv.get("task_kv", window=5), r"task_kv: parameter 'window' must be an int >= 6 \(sinks \+ 2\), got 5"),
    (lambda: kv.get("a2ats", codes=1), r"a2ats: parameter 'codes' must be an int >= 2, got 1"),
    (lambda: kv.get("quest", dense_layers=-1), r"quest: parameter 'dense_layers' must be a non-negative int, got -1"),
    (lambda: kv.get("tova", ratio=1.0), r"tova: parameter 'ratio' must be a number in \[0, 1\), the fraction"),
    (lambda: get_probe("decore", distractors=8), r"decore: parameter 'distractors' must be an int in \[0, 7\], got 8"),
    (lambda: get_probe("sink", beta=-0.1), r"sink: parameter 'beta' must be a number in \[0, 1\], got -0\.1"),
    (lambda: get_probe("lookback_lens", examples=3), r"lookback_lens: parameter 'examples' must be an even int >= 2"),
])
def test_a_bad_value_is_a_value_error_naming_the_parameter_and_its_range(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("make, match", [
    (lambda: kv.get("snapkv", window=64.0), r"snapkv: parameter 'window' must be int, got float"),
    (lambda: kv.get("streaming_llm", sinks=True), r"streaming_llm: parameter 'sinks' must be int, got bool"),
    (lambda: kv.get("random", seed="0"), r"random: parameter 'seed' must be int, got str"),
    (lambda: get_probe("massive_activations", top=None), r"massive_activations: parameter 'top' must be int, got NoneType"),
])
def test_a_value_of_the_wrong_type_is_a_type_error(make, match):
    with pytest.raises(TypeError, match=match):
        make()


def test_a_cross_parameter_check_runs_after_the_parameters_validate():
    with pytest.raises(ValueError, match="kv_quant removes no entries: ratio must be 0"):
        kv.get("kv_quant", ratio=0.5)
    with pytest.raises(ValueError, match="parameter 'bits'"):  # each parameter first
        kv.get("kv_quant", ratio=0.5, bits=3)


# ---- every declared default validates; parameters become attributes; repr shows them ---------------


@pytest.mark.parametrize("cls", PRESSES + PROBE_CLASSES, ids=_ids(PRESSES + PROBE_CLASSES))
def test_every_declared_default_validates_and_becomes_an_attribute(cls):
    names = [p.name for p in cls.params]
    assert len(names) == len(set(names)), names
    for p in cls.params:
        assert isinstance(p, Param) and p.doc and (p.check is None or p.expected), (cls.name, p.name)
        assert p.validate(cls.name, p.default) == p.default
    obj = cls()
    assert obj.config == {p.name: p.default for p in cls.params}
    for p in cls.params:
        assert getattr(obj, p.name) == p.default
    assert all(f"{p.name}=" in repr(obj) for p in cls.params)


@pytest.mark.parametrize("cls", PRESSES, ids=_ids(PRESSES))
def test_every_press_declares_the_base_ratio_first_and_documents_each_parameter(cls):
    assert cls.params[0] is kv.KVPress.params[0] and cls.params[0].name == "ratio"
    assert list(cls.param_docs()) == [p.name for p in cls.params]


def test_every_variant_default_validates():
    for name in registry.names():
        cls = registry.variant_class(name)
        assert validate_params(name, cls.params, {}) == {p.name: p.default for p in cls.params}


def test_non_default_values_are_attributes_and_repr_shows_them():
    press = kv.get("snapkv", ratio=0.5, window=32)
    assert (press.ratio, press.window, press.kernel) == (0.5, 32, 5)
    assert repr(press) == "SnapKVPress(ratio=0.5, window=32, kernel=5)"
    assert isinstance(kv.get("knorm", ratio=0).ratio, float)
    assert kv.get("duo_attention").sinks == 16 and kv.get("razor").sinks == 4  # per-press defaults
    probe = get_probe("active_dormant", dormant=0.5)
    assert probe.dormant == 0.5 and repr(probe) == "ActiveDormant(dormant=0.5)"
    assert kv.get("snapkv").param_docs()["kernel"] == "average-pooling kernel"


def test_validate_params_names_each_misspelling_and_refuses_a_parameter_declared_twice():
    declared = (positive_int("window", 4, "w"), positive_int("right", 1, "r"))
    assert validate_params("v", declared, {"right": 3}) == {"window": 4, "right": 3}
    with pytest.raises(TypeError, match=r"did you mean 'right' for 'rite', 'window' for 'windw'\?"):
        validate_params("v", declared, {"windw": 1, "rite": 2})
    with pytest.raises(ValueError, match=r"v: parameter\(s\) \['window'\] declared more than once"):
        validate_params("v", declared + (positive_int("window", 2, "again"),), {})


# ---- one registry pattern ------------------------------------------------------------------------------


def _named(name: str) -> type:
    return type(f"C_{name}", (), {"name": name})


def test_a_registry_refuses_duplicates_and_suggests_close_names():
    things = Registry("thing")
    alpha, beta = _named("alpha"), _named("beta")
    assert things.register(alpha) is alpha and things.register(beta) is beta
    assert things.register(alpha) is alpha  # the same class again: nothing happens
    with pytest.raises(ValueError, match=r"thing name 'alpha' is registered twice \(C_alpha, C_alpha\)"):
        things.register(_named("alpha"))
    with pytest.raises(ValueError, match="needs a non-empty str `name`"):
        things.register(_named(""))
    assert things.get("beta") is beta
    assert things.names() == ["alpha", "beta"] and list(things) == [alpha, beta] and len(things) == 2
    assert "alpha" in things and "gamma" not in things
    with pytest.raises(ValueError, match=r"unknown thing 'alpah' \(did you mean 'alpha'\?\); known things: alpha, beta"):
        things.get("alpah")
    with pytest.raises(ValueError, match=r"unknown thing 'zzz'; known things: alpha, beta"):
        things.get("zzz")
    with pytest.raises(TypeError, match="thing must be a str name, got int"):
        things.get(3)


def test_the_variant_press_and_probe_registries_refuse_a_taken_name_and_suggest_close_ones():
    class Full(az.Variant):
        name = "full"
        family = "masks"

    class Snap(kv.KVPress):
        name = "snapkv"

    class Sink(PROBE_REGISTRY.get("sink")):
        pass

    before = (registry.names(), _ids(kv.methods()), list(PROBES))
    with pytest.raises(ValueError, match="variant name 'full' is registered twice"):
        az.register(Full)
    with pytest.raises(ValueError, match="KV-cache method name 'snapkv' is registered twice"):
        kv.register(Snap)
    with pytest.raises(ValueError, match="probe name 'sink' is registered twice"):
        PROBE_REGISTRY.register(Sink)
    assert (registry.names(), _ids(kv.methods()), list(PROBES)) == before
    with pytest.raises(ValueError, match=r"unknown variant 'slidng_window' \(did you mean 'sliding_window'\?\)"):
        registry.variant_class("slidng_window")
    with pytest.raises(ValueError, match=r"unknown KV-cache method 'snapk' \(did you mean 'snapkv'\?\); known "
                                         r"KV-cache methods: random, "):
        kv.get("snapk")
    with pytest.raises(ValueError, match=r"unknown probe 'sinks' \(did you mean 'sink'\?\); known probes: retrieval, "):
        get_probe("sinks")


def test_a_press_must_declare_ratio():
    class NoRatio(kv.KVPress):
        name = "_test_no_ratio"
        params = (positive_int("window", 4, "w"),)

    with pytest.raises(ValueError, match="_test_no_ratio: params must declare 'ratio'"):
        kv.register(NoRatio)
    assert "_test_no_ratio" not in _ids(kv.methods())


# ---- one Paper type ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", PRESSES + PROBE_CLASSES, ids=_ids(PRESSES + PROBE_CLASSES))
def test_every_press_and_probe_cites_a_paper_object(cls):
    if cls.name == "random":
        assert cls.paper is None
        return
    assert isinstance(cls.paper, Paper) and cls.paper.title and 2010 < cls.paper.year < 2030
    assert "(" not in cls.paper.title[-12:], "authors belong in no title"
