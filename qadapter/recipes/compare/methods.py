"""Methods a comparison trains and the policies it evaluates.

A method spec is a method of :data:`qadapter.recipes.methods.METHOD_REGISTRY` with settings of its own (``dpo:beta=0.3``);
every evaluated policy is a :class:`PolicyPoint`: the base model, a trained spec, or a Q-Adapter
spec at one decode-time strength (``qadapter@0.5``).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

from ..methods import METHOD_REGISTRY, MethodParam  # noqa: F401  (MethodParam: re-exported)


#: the methods compared by default (the paper's Table: Q-Adapter and its SFT / Replay / DPO baselines)
METHODS = ("qadapter", "sft", "replay", "dpo")


# --------------------------------------------------------------------------- method specs and policy points
def number_text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class MethodSpec:
    """One trained method: ``method`` with some training settings changed (``dpo:beta=0.3``).
    A plain name (``dpo``) trains with the comparison's settings, into ``OUT/dpo/`` as before."""

    method: str
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        if not self.params:
            return self.method
        return self.method + ":" + ",".join(f"{k}={number_text(v)}" for k, v in self.params)

    @property
    def folder(self) -> str:
        """The folder name under OUT (and under OUT/eval) of this spec."""
        return self.method + "".join(f"_{k}={number_text(v)}" for k, v in self.params)

    def setting_label(self) -> str:
        return ", ".join(f"{METHOD_REGISTRY[self.method].params[k].label}={number_text(v)}" for k, v in self.params)

    def apply(self, job, config):
        """(job, config) of this spec: copies of the comparison's with the spec's settings."""
        job_changes = {METHOD_REGISTRY[self.method].params[k].field: v for k, v in self.params
                       if METHOD_REGISTRY[self.method].params[k].target == "job"}
        job = dataclasses.replace(job, method=self.method, **job_changes)
        tied = config.alpha_0 == config.alpha_tilde  # α0 resolved to α̃ by QAdapterConfig (residual default)
        config = copy.deepcopy(config)
        for k, v in self.params:
            param = METHOD_REGISTRY[self.method].params[k]
            if param.target == "config":
                setattr(config, param.field, v)
        if tied and "alpha_tilde" in dict(self.params) and "alpha_0" not in dict(self.params):
            config.alpha_0 = config.alpha_tilde  # a spec's α̃ keeps the α's tied
        return job, config


def parse_method_spec(text: "str | MethodSpec") -> MethodSpec:
    """``"dpo"``, ``"dpo:beta=0.3"``, ``"sft:max_steps=20,learning_rate=1e-4"`` → :class:`MethodSpec`.
    An unknown method or setting, or a value of the wrong type, is a ValueError naming the spec."""
    if isinstance(text, MethodSpec):
        return text
    spec = str(text).strip()
    method, _, rest = spec.partition(":")
    method = method.strip()
    if method not in METHOD_REGISTRY:
        raise ValueError(f"method spec {spec!r}: unknown method {method!r}; known: {', '.join(METHOD_REGISTRY)}")
    known = METHOD_REGISTRY[method].params
    params: dict[str, Any] = {}
    for part in (p.strip() for p in rest.split(",") if p.strip()) if rest.strip() else ():
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or not value.strip():
            raise ValueError(f"method spec {spec!r}: {part!r} is not NAME=VALUE")
        if key not in known:
            raise ValueError(f"method spec {spec!r}: {method} has no setting {key!r}; it takes "
                             f"{', '.join(known)}")
        if key in params:
            raise ValueError(f"method spec {spec!r}: {key} given twice")
        try:
            number = known[key].type(value.strip())
        except ValueError:
            raise ValueError(f"method spec {spec!r}: {key}={value.strip()!r} is not a {known[key].type.__name__}") from None
        if not (number > 0 or (number == 0 and known[key].zero_ok)):
            raise ValueError(f"method spec {spec!r}: {key} must be {'>= 0' if known[key].zero_ok else '> 0'}, "
                             f"got {value.strip()}")
        params[key] = number
    if rest.strip() == "" and ":" in spec:
        raise ValueError(f"method spec {spec!r}: nothing after ':' (give NAME=VALUE, or the plain method name)")
    return MethodSpec(method, tuple(sorted(params.items())))


@dataclass(frozen=True)
class PolicyPoint:
    """One evaluated policy, a point of the frontier: the base model, a trained spec, or a
    Q-Adapter spec decoded at ``strength`` (``qadapter@0.5``: one trained adapter, many points);
    ``start``: the earlier customization every spec was trained on (``--on DIR``), as it was."""

    spec: MethodSpec | None  # None: the base model (or, with start, the --on policy)
    strength: float | None = None
    start: bool = False

    @property
    def name(self) -> str:
        if self.spec is None:
            return "start" if self.start else "base"
        return self.spec.name + ("" if self.strength is None else f"@{number_text(float(self.strength))}")

    @property
    def folder(self) -> str:
        if self.spec is None:
            return self.name
        return self.spec.folder + ("" if self.strength is None else f"@{number_text(float(self.strength))}")

    @property
    def curve(self) -> str:
        """The curve this point is drawn on: a Q-Adapter's strengths join per trained adapter, a
        baseline's settings join per method."""
        if self.spec is None:
            return self.name
        if self.strength is not None:
            return self.spec.name
        if self.spec.method == "qadapter" and self.spec.params:  # not on the strengths curve of "qadapter"
            return ("qadapter, β (χ²)=0: DPO at β=α̃" if dict(self.spec.params).get("beta") == 0
                    else "qadapter, other settings")
        return self.spec.method

    def setting_label(self) -> str:
        if self.spec is None:
            return ""
        parts = [self.spec.setting_label()] if self.spec.params else []
        if self.strength is not None:
            parts.append(f"strength={number_text(float(self.strength))}")
        return ", ".join(parts)


def policy_points(specs: Sequence[MethodSpec], strengths: Sequence[float] | None = None,
                  start: bool = False, strength_specs: set[str] | None = None) -> list[PolicyPoint]:
    """The evaluated points (base first, then the ``start`` policy where the specs were trained on
    an earlier customization): every Q-Adapter spec at every decode-time strength (at its trained
    setting when ``strengths`` is None, or when ``strength_specs`` does not name it), every other
    spec once."""
    points = [PolicyPoint(None)] + ([PolicyPoint(None, start=True)] if start else [])
    for spec in specs:
        if spec.method == "qadapter" and strengths and (strength_specs is None or spec.name in strength_specs):
            points += [PolicyPoint(spec, float(s)) for s in strengths]
        else:
            points.append(PolicyPoint(spec))
    return points


# --------------------------------------------------------------------------- several strengths, one forward
def point_record(point: PolicyPoint) -> dict[str, Any]:
    return {"name": point.name, "folder": point.folder, "curve": point.curve,
            "method": point.spec.method if point.spec else point.name, "spec": point.spec.name if point.spec else None,
            "params": dict(point.spec.params) if point.spec else {}, "strength": point.strength,
            "setting": point.setting_label()}


def strength_name(strength: float) -> str:
    return f"strength={float(strength)!r}"  # qadapter.scoring.policy_specs' name of that policy
